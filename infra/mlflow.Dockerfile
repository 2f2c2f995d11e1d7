# MLflow tracking server with PostgreSQL and S3 (MinIO) support.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" psycopg2-binary boto3
EXPOSE 5000
