"""Every checkpoint format users hold, as tiny real instances built here from configs
(transformers, peft, open_clip; offline), through ``mergeflow merge`` and ``inspect``; each
merge is checked against a reference computed from the materialized weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from conftest import finetune_like
from formats import (
    hf_clip,
    hf_clip_config,
    hub_cache,
    llama,
    llama_folders,
    lora_adapters,
    lora_delta,
    quiet_transformers,
    save_clip_tokenizer,
    save_hf_vision_file,
    task_vectors_checkpoints,
)
from safetensors.torch import load_file
from test_cart import reference_cart

from mergeflow.architectures import describe
from mergeflow.checkpoints import load_state_dict, open_checkpoint, save_state_dict
from mergeflow.cli import main
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.merge import merge_readers
from mergeflow.methods.cart import AllMatrices, LowRankSelection
from mergeflow.storage import CheckpointCache, current_umask

LLAMA_MATRICES = re.compile(
    r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)


def merge(*args: str) -> tuple[int, str, str]:
    """``mergeflow merge ARGS`` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["merge", *args, "-q"])
    if code != 0:  # bad input: one line, naming what is wrong
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    return code, out.getvalue(), err.getvalue().strip()


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mergeflow", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return llama_folders(tmp_path_factory.mktemp("llama"))


def expected_cart(states, rank_ratio, scale=1.0):
    selected = {k for k in states[0] if LLAMA_MATRICES.search(k)}
    return reference_cart(
        [{k: v.double() for k, v in s.items()} for s in states], rank_ratio, scale, selected
    )


# --- model folders, shards, hub references, S3 ----------------------------------------------


def test_sharded_llm_folders_merge_into_a_folder_transformers_loads(llamas, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders, states = llamas
    assert (folders[1] / "model.safetensors.index.json").is_file()  # transformers sharded it
    out = tmp_path / "merged"
    previous = os.umask(0o022)
    try:
        code, stdout, err = merge(
            "--method",
            "cart",
            "--base",
            str(folders[0]),
            "--finetuned",
            *map(str, folders[1:]),
            "--param",
            "rank_ratio=0.25",
            "--out",
            str(out),
            "--shard-size",
            "30KB",
        )
    finally:
        os.umask(previous)
    assert code == 0, err
    assert "14 low-rank" in stdout  # 2 layers × (q, k, v, o, gate, up, down)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 30_000 + 2_000 for p in shards)  # header aside
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in shards)
    card = (out / "README.md").read_text()
    assert "`cart`" in card and "rank_ratio=0.25" in card
    assert all(str(f) in card for f in folders)
    assert len(re.findall(r"`[0-9a-f]{64}`", card)) == 4

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    expected = expected_cart(states[1:], 0.25)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key].to(torch.bfloat16), msg=key)
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == [1, 2]


def test_one_shard_alone_is_refused_naming_its_index(llamas, tmp_path):
    folders, _ = llamas
    shard = sorted(folders[1].glob("model-00001-of-*.safetensors"))[0]
    code, _, err = merge(
        "--method",
        "average",
        "--finetuned",
        str(shard),
        str(folders[2]),
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert str(shard) in err and str(folders[1] / "model.safetensors.index.json") in err
    assert "one shard" in err
    lone = tmp_path / "lone" / shard.name
    lone.parent.mkdir()
    shutil.copy(shard, lone)  # no index beside it: still recognisable by its name
    code, _, err = merge(
        "--method",
        "average",
        "--finetuned",
        str(lone),
        str(lone),
        "--out",
        str(tmp_path / "y.safetensors"),
    )
    assert code == 2 and "shard 1 of" in err and "no *.index.json" in err


def test_torch_weight_folders_whole_and_sharded_merge_like_safetensors(llamas, tmp_path):
    folders, states = llamas
    torch_folders = []
    for i, state in enumerate(states[1:]):  # pytorch_model.bin, and a sharded .bin index
        folder = tmp_path / f"bin{i}"
        folder.mkdir()
        shutil.copy(folders[1] / "config.json", folder / "config.json")
        if i == 0:
            torch.save(state, folder / "pytorch_model.bin")
        else:
            keys = list(state)
            parts = {
                "pytorch_model-00001-of-00002.bin": keys[:5],
                "pytorch_model-00002-of-00002.bin": keys[5:],
            }
            for name, part in parts.items():
                torch.save({k: state[k] for k in part}, folder / name)
            weight_map = {k: name for name, part in parts.items() for k in part}
            (folder / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
        torch_folders.append(str(folder))
    out_bin, out_st = tmp_path / "bin.safetensors", tmp_path / "st.safetensors"
    assert (
        merge("--method", "average", "--finetuned", *torch_folders, "--out", str(out_bin))[0] == 0
    )
    assert (
        merge("--method", "average", "--finetuned", *map(str, folders[1:]), "--out", str(out_st))[0]
        == 0
    )
    from_bin, from_st = load_state_dict(out_bin), load_state_dict(out_st)
    assert from_bin.keys() == from_st.keys()
    assert all(torch.equal(from_bin[k], from_st[k]) for k in from_st)


def test_a_folder_without_weights_is_named_with_what_it_holds(tmp_path):
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"empty-model: a folder with no checkpoint.*config\.json"
    ):
        open_checkpoint(tmp_path / "empty-model", CheckpointCache(tmp_path / "cache"))


def test_model_folders_on_s3_merge_to_s3(llamas, bucket, tmp_path):
    import boto3

    folders, states = llamas
    client = boto3.client("s3")
    for folder in folders:
        for path in folder.iterdir():
            client.upload_file(str(path), bucket, f"llama/{folder.name}/{path.name}")
    cache = CheckpointCache(tmp_path / "cache")
    from mergeflow.merge import merge_files

    report = merge_files(
        "task_arithmetic",
        f"s3://{bucket}/llama/base",
        [f"s3://{bucket}/llama/{f.name}/" for f in folders[1:]],
        {"scale": 0.5},
        f"s3://{bucket}/merged/ta/",
        cache=cache,
    )
    assert report.counts.element_wise > 0
    keys = {
        o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="merged/ta/")["Contents"]
    }
    assert {"merged/ta/model.safetensors.index.json", "merged/ta/config.json"} <= keys
    merged = load_state_dict(f"s3://{bucket}/merged/ta", cache)
    base = states[0]
    for key, value in merged.items():
        expected = base[key].double() + 0.5 * sum(
            s[key].double() - base[key].double() for s in states[1:]
        )
        torch.testing.assert_close(value, expected.to(torch.bfloat16), msg=key)


def test_hub_references_resolve_through_the_hub_cache(llamas, tmp_path):
    folders, states = llamas
    hub = tmp_path / "hub"
    for i, folder in enumerate(folders):
        _, commit = hub_cache(hub, f"acme/llama-{i}", folder)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "MERGEFLOW_CACHE_DIR": str(tmp_path)}
    out = tmp_path / "avg.safetensors"
    result = run_cli(
        "merge",
        "--method",
        "average",
        "--base",
        "hf://acme/llama-0@main",
        "--finetuned",
        "hf://acme/llama-1",
        "hf://acme/llama-2",
        f"hf://acme/llama-3@{commit}",
        "--out",
        str(out),
        "-q",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    merged = load_state_dict(out)
    for key, value in merged.items():
        expected = torch.stack([s[key].double() for s in states[1:]]).mean(0)
        torch.testing.assert_close(value, expected.to(torch.bfloat16), msg=key)
    missing = run_cli("inspect", "hf://acme/none", env=env)
    assert missing.returncode == 2
    assert "hf://acme/none" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


# --- PEFT LoRA adapters ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A float32 Llama base folder and three LoRA adapters of different ranks (one rsLoRA)."""
    root = tmp_path_factory.mktemp("lora")
    folders, states = llama_folders(root, num_tasks=0, dtype=torch.float32)
    targets = ["q_proj", "v_proj"]
    adapters = lora_adapters(
        root,
        folders[0],
        [
            dict(r=2, lora_alpha=8, target_modules=targets),
            dict(r=4, lora_alpha=8, target_modules=targets),
            dict(r=4, lora_alpha=8, target_modules=targets, use_rslora=True),
        ],
    )
    return folders[0], states[0], adapters


def materialized(base, adapters):
    """Each adapter's whole fine-tuned model θ₀ + ΔW, float64, from its files."""
    modules = sorted(k.removesuffix(".weight") for k in base if re.search(r"[qv]_proj\.weight$", k))
    return [
        {
            k: v.double()
            + (
                lora_delta(a, k.removesuffix(".weight"))
                if k.removesuffix(".weight") in modules
                else 0
            )
            for k, v in base.items()
        }
        for a in adapters
    ]


def test_lora_adapters_merge_as_their_dense_task_vectors(loras, tmp_path):
    base_folder, base, adapters = loras
    thetas = materialized(base, adapters)
    out = tmp_path / "cart.safetensors"
    code, stdout, err = merge(
        "--method",
        "cart",
        "--base",
        str(base_folder),
        "--finetuned",
        *map(str, adapters),
        "--param",
        "rank_ratio=0.25",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "4 low-rank" in stdout  # q and v of two layers; everything else copied unchanged
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~current_umask()  # not 0600
    merged = load_state_dict(out)
    expected = reference_cart(
        thetas, 0.25, 1.0, {k for k in base if re.search(r"[qv]_proj\.weight$", k)}
    )
    # float32 SVDs against a float64 reference: where τ̄_t's singular values next to the cut
    # (k = 8 of 32) lie 5% apart, float32 rounding moves a kept subspace by about
    # eps32 · ‖τ̄_t‖ / gap, up to ~1e-5 in an entry; the merge it checks moves entries by > 1e-3
    for key in merged:
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-5, atol=1e-5)
    # the factors merged apart would be something else: the adapters' q deltas are not
    # the merge of their A and B
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[key].double(), base[key].double(), atol=1e-3)

    ta = tmp_path / "ta.safetensors"
    assert (
        merge(
            "--method",
            "task_arithmetic",
            "--base",
            str(base_folder),
            "--finetuned",
            *map(str, adapters),
            "--param",
            "scale=0.7",
            "--out",
            str(ta),
        )[0]
        == 0
    )
    summed = load_state_dict(ta)
    for key in summed:
        delta = sum(t[key] - base[key].double() for t in thetas)
        torch.testing.assert_close(
            summed[key].double(), base[key].double() + 0.7 * delta, rtol=1e-5, atol=1e-6
        )


def test_a_merged_lora_adapter_loads_in_peft_and_holds_the_merged_delta(loras, tmp_path):
    import peft
    from transformers import LlamaForCausalLM

    base_folder, base, adapters = loras
    full = tmp_path / "full.safetensors"
    assert (
        merge(
            "--method",
            "cart",
            "--base",
            str(base_folder),
            "--finetuned",
            *map(str, adapters),
            "--out",
            str(full),
        )[0]
        == 0
    )
    merged = load_state_dict(full)
    for rank in (32, 3):
        out = tmp_path / f"adapter-r{rank}"
        code, stdout, err = merge(
            "--method",
            "cart",
            "--base",
            str(base_folder),
            "--finetuned",
            *map(str, adapters),
            "--out",
            str(out),
            "--out-format",
            "lora",
            "--rank",
            str(rank),
        )
        assert code == 0, err
        assert "keeps" in stdout
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == rank
        model = peft.PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32), out
        ).merge_and_unload()
        loaded = model.state_dict()
        for key in merged:
            delta = merged[key].double() - base[key].double()
            if delta.abs().max() == 0:
                torch.testing.assert_close(loaded[key], base[key])
                continue
            u, s, vh = torch.linalg.svd(delta)
            k = min(rank, len(s))
            best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]  # the rank-R part of the delta
            torch.testing.assert_close(
                loaded[key].double() - base[key].double(), best, rtol=1e-4, atol=1e-5, msg=key
            )


def test_lora_refusals_name_what_is_wrong(loras, tmp_path):
    base_folder, _, adapters = loras
    other = lora_adapters(
        tmp_path, base_folder, [dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"])]
    )[0]
    code, _, err = merge(
        "--method",
        "cart",
        "--base",
        str(base_folder),
        "--finetuned",
        str(adapters[0]),
        str(other),
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert code == 2 and "different target modules" in err
    assert str(adapters[0]) in err and str(other) in err and "k_proj" in err

    code, _, err = merge(
        "--method",
        "cart",
        "--finetuned",
        *map(str, adapters),
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert code == 2 and "LoRA adapter" in err and "base" in err

    bare = tmp_path / "bare" / "adapter_model.safetensors"
    bare.parent.mkdir()
    shutil.copy(adapters[0] / "adapter_model.safetensors", bare)
    code, _, err = merge(
        "--method",
        "cart",
        "--finetuned",
        str(bare),
        str(bare),
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert code == 2 and str(bare) in err and "adapter_config.json" in err

    dora = tmp_path / "dora"
    shutil.copytree(adapters[1], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    code, _, err = merge(
        "--method",
        "average",
        "--base",
        str(base_folder),
        "--finetuned",
        str(adapters[0]),
        str(dora),
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert code == 2 and "use_dora" in err and str(dora) in err

    code, _, err = merge(
        "--method",
        "cart",
        "--base",
        str(base_folder),
        "--finetuned",
        str(base_folder),
        str(base_folder),
        "--out",
        str(tmp_path / "l"),
        "--out-format",
        "lora",
        "--rank",
        "4",
    )
    assert code == 2 and "PEFT adapter" in err


# --- architectures as data ------------------------------------------------------------------


def hf_models():
    """Tiny transformers models of each family, from configs."""
    from transformers import (
        BertConfig,
        BertModel,
        T5Config,
        T5Model,
        ViTConfig,
        ViTModel,
    )

    quiet_transformers()
    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return {
        "vit": (ViTModel(ViTConfig(image_size=8, patch_size=4, **small)), 2 * 6),
        "bert": (BertModel(BertConfig(vocab_size=50, **small)), 2 * 6),
        "t5": (
            T5Model(
                T5Config(
                    vocab_size=50,
                    d_model=16,
                    d_kv=8,
                    d_ff=32,
                    num_layers=2,
                    num_decoder_layers=2,
                    num_heads=2,
                )
            ),
            2 * 6 + 2 * 10,
        ),
        "llama": (llama(), 2 * 7),
        "clip": (hf_clip(), 2 * 6 * 2),
    }


def test_each_familys_attention_and_mlp_matrices_are_selected():
    for name, (model, expected) in hf_models().items():
        state = model.state_dict()
        chosen = [k for k, v in state.items() if LowRankSelection().selects(k, v.shape)]
        assert len(chosen) == expected, (name, chosen)
        assert describe(state) != "unrecognised", name
        attention = [
            k
            for k in state
            if re.search(r"(attention|SelfAttention|attn)\.", k)
            and k.endswith("weight")
            and state[k].ndim == 2
            and "relative_attention_bias" not in k
        ]  # T5's bias table, not a map
        assert set(attention) <= set(chosen), (name, set(attention) - set(chosen))
        tables = [
            k
            for k in state
            if re.search(
                r"(word_embeddings|token_type_embeddings|token_embedding|embed_tokens|shared|lm_head)"
                r"\.weight$",
                k,
            )
        ]
        assert tables or name == "vit", name  # a ViT has no vocabulary
        assert not any(AllMatrices().selects(k, state[k].shape) for k in tables), name
        assert AllMatrices().selects(chosen[0], state[chosen[0]].shape), name


def test_checkpoints_saved_with_older_transformers_names_are_selected_too():
    keys = [
        f"vit.encoder.layer.0.{name}.weight"
        for name in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]
    assert all(LowRankSelection().selects(k, (8, 8)) for k in keys)
    assert not LowRankSelection().selects("vit.pooler.dense.weight", (8, 8))
    assert describe(keys) == "Hugging Face ViT / BERT / RoBERTa"


def test_cart_low_ranks_bert_attention_and_a_selection_of_nothing_is_refused():
    from mergeflow.checkpoints import StateDictReader

    model, _ = hf_models()["bert"]
    tuned = finetune_like(model.state_dict(), 3)
    readers = [StateDictReader(s, f"bert{i}") for i, s in enumerate(tuned)]
    merged = merge_readers("cart", readers, params={"rank_ratio": 0.25}, device="cpu")
    selected = {k for k, v in tuned[0].items() if LowRankSelection().selects(k, v.shape)}
    expected = reference_cart(tuned, 0.25, 1.0, selected)
    key = "encoder.layer.0.attention.self.query.weight"
    assert key in selected
    for k in merged:
        torch.testing.assert_close(merged[k].double(), expected[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ParameterError, match=r"selects no weight matrix of bert0.*include=REGEX"):
        merge_readers("cart", readers, params={"include": "no_such_layer"}, device="cpu")


# --- inspect --------------------------------------------------------------------------------


def test_inspect_says_what_a_checkpoint_is(llamas, loras, tmp_path, capsys):
    folders, states = llamas
    assert main(["inspect", str(folders[1])]) == 0
    text = capsys.readouterr().out
    assert "sharded safetensors" in text and "Llama" in text and "bfloat16" in text
    parameters = sum(v.numel() for v in states[1].values())
    assert f"{parameters:,} parameters" in text
    assert "cart, cart_indexed, cart_adamerging: 14 low-rank" in text

    base_folder, _, adapters = loras
    assert main(["inspect", str(adapters[1]), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["format"].startswith("PEFT LoRA adapter")
    assert found["lora"]["ranks"] == "4" and found["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert main(["inspect", str(adapters[0]), "--base", str(base_folder)]) == 0
    assert "rank 2" in capsys.readouterr().out


# --- CLIP: task-vectors pickles, their state dicts, HF CLIP, FusionBench's layout -----------


@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory):
    """A tiny open_clip CLIP (the demo's architecture) and two fine-tuned copies whose image
    towers moved, as safetensors files."""
    from mergeflow.models import create_model

    root = tmp_path_factory.mktemp("open_clip")
    torch.manual_seed(0)
    base = create_model("mergeflow-tiny-vit").state_dict()
    visual = {k: v for k, v in base.items() if k.startswith("visual.")}
    tuned = [{**base, **moved} for moved in finetune_like(visual, 2, strength=0.02)]
    paths = []
    for i, state in enumerate([base, *tuned]):
        paths.append(root / ("base.safetensors" if i == 0 else f"task{i}.safetensors"))
        save_state_dict(state, paths[-1])
    return root, paths, [base, *tuned]


def test_task_vectors_pickled_modules_are_read_without_their_code(open_clip_models, tmp_path):
    root, paths, states = open_clip_models
    modules, state_files, names, (marker, code) = task_vectors_checkpoints(
        tmp_path, "mergeflow-tiny-vit", paths[1:]
    )
    cache = CheckpointCache(tmp_path / "cache")
    for module_file, names_file, state in zip(modules, names, states[1:], strict=True):
        with open_checkpoint(module_file, cache) as reader:
            assert "pickled module src.modeling.ImageEncoder" in reader.format
            read = reader.to_state_dict()
        saved = load_file(str(names_file))  # what encoder.state_dict() gave, in its process
        assert set(read) == {k.removeprefix("model.") for k in saved}
        assert not any(k.startswith("transformer.") for k in read)  # the text tower was deleted
        for key, value in read.items():
            assert torch.equal(value, saved[f"model.{key}"]), key
            assert torch.equal(value, state[key]), key
    assert not marker.exists()
    sys.path.insert(0, str(code))  # with the module's code importable, still nothing runs
    try:
        load_state_dict(modules[0], cache)
    finally:
        sys.path.remove(str(code))
    assert not marker.exists() and "src.modeling" not in sys.modules

    # both task-vectors formats merge like the open_clip files, the text tower from the base
    selected = {k for k in states[0] if LowRankSelection().selects(k, states[0][k].shape)}
    expected = reference_cart(states[1:], 0.25, 1.0, selected)
    for inputs in (modules, state_files):
        out = tmp_path / f"merged-{inputs[0].name}.safetensors"
        code, stdout, err = merge(
            "--method",
            "cart",
            "--base",
            str(paths[0]),
            "--finetuned",
            *map(str, inputs),
            "--param",
            "rank_ratio=0.25",
            "--out",
            str(out),
        )
        assert code == 0, err
        merged = load_state_dict(out)
        assert set(merged) == set(states[0])
        assert "from the base only" in stdout
        for key, value in merged.items():
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-4, atol=1e-5)


def test_a_base_without_a_text_tower_is_refused_saying_what_to_give(open_clip_models):
    from mergeflow.evaluation import check_text_tower

    _, _, states = open_clip_models
    check_text_tower(states[0], "base.safetensors")  # a whole CLIP passes
    zeroshot = {k: v for k, v in states[0].items() if not k.startswith("transformer.")}
    with pytest.raises(ParameterError) as refused:
        check_text_tower(zeroshot, "zeroshot.pt")
    message = str(refused.value)
    assert message.startswith("base zeroshot.pt: has no text tower")
    assert "'transformer.resblocks.0.attn.in_proj_weight'" in message
    assert "whole pre-trained CLIP" in message


def test_hf_clip_converts_to_open_clip_with_equal_logits(tmp_path):
    from mergeflow import hf_clip as convert
    from mergeflow.models import create_model, resolve_model, tokenizer_for

    for quick_gelu in (True, False):
        model = hf_clip(hf_clip_config(quick_gelu=quick_gelu), seed=int(quick_gelu))
        folder = tmp_path / f"clip-{quick_gelu}"
        model.save_pretrained(folder)
        arch = resolve_model(str(folder))
        converted = create_model(arch, load_file(str(folder / "model.safetensors")))
        text = tokenizer_for(arch)(["a photo of a cat", "a diagram of a dog"])
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model(input_ids=text, pixel_values=images).logits_per_image
            image, words = converted.encode_image(images), converted.encode_text(text)
            image = image / image.norm(dim=-1, keepdim=True)
            words = words / words.norm(dim=-1, keepdim=True)
            logits = converted.logit_scale.exp() * image @ words.T
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        state = model.state_dict()
        back = convert.from_open_clip(convert.to_open_clip(state))
        assert all(torch.equal(back[k], state[k]) for k in state if "position_ids" not in k)
    with pytest.raises(ParameterError, match=r"config\.json: hidden_act.*gelu_new"):
        convert.open_clip_config(
            {
                "model_type": "clip",
                "vision_config": {"hidden_act": "gelu_new"},
                "text_config": {"hidden_act": "gelu_new"},
            }
        )


def test_a_clip_folders_own_tokenizer_makes_the_heads(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from mergeflow.models import create_model, resolve_model, tokenizer_for, zero_shot_head

    model = hf_clip(seed=5)
    model.save_pretrained(tmp_path / "clip")
    save_clip_tokenizer(tmp_path / "clip")
    arch = resolve_model(str(tmp_path / "clip"))
    assert arch.tokenizer_dir == str(tmp_path / "clip")
    tokenizer = tokenizer_for(arch)
    assert not isinstance(tokenizer, SimpleTokenizer)  # the folder's, through transformers
    converted = create_model(arch, model.state_dict())
    classes, templates = ["cat", "dog", "annual crop land"], ["a photo of a {c}.", "a {c}."]
    head = zero_shot_head(converted, tokenizer, classes, templates)
    # transformers' own text tower on its own tokenizer's ids gives the same head
    rows = []
    for name in classes:
        ids = tokenizer([t.format(c=name) for t in templates])
        with torch.no_grad():
            features = model.get_text_features(input_ids=ids)
        if not isinstance(features, torch.Tensor):
            features = features.pooler_output
        mean = torch.nn.functional.normalize(features, dim=-1).mean(0)
        rows.append(mean / mean.norm())
    torch.testing.assert_close(head, torch.stack(rows), rtol=1e-5, atol=1e-6)
    # and CLIP's BPE without the files (padding apart) gives the same head as well
    clip_bpe = zero_shot_head(converted, SimpleTokenizer(context_length=16), classes, templates)
    torch.testing.assert_close(head, clip_bpe, rtol=1e-5, atol=1e-6)


def test_fusion_bench_layout_merges_the_vision_tower_and_keeps_the_base_text(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel

    base = hf_clip(seed=3)
    base.save_pretrained(tmp_path / "base")
    vision = {k: v for k, v in base.state_dict().items() if k.startswith("vision_model.")}
    tuned = finetune_like(vision, 3, strength=0.02)
    paths = []
    for i, state in enumerate(tuned[:2]):  # as transformers 5 saves a CLIPVisionModel
        model = CLIPVisionModel(base.config.vision_config)
        model.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()})
        model.save_pretrained(tmp_path / f"task{i}")
        paths.append(str(tmp_path / f"task{i}"))
    paths.append(str(tmp_path / "task2.safetensors"))  # as FusionBench's hub files hold it
    save_hf_vision_file(tuned[2], tmp_path / "task2.safetensors")
    out = tmp_path / "merged"
    code, stdout, err = merge(
        "--method",
        "cart",
        "--base",
        str(tmp_path / "base"),
        "--finetuned",
        *paths,
        "--param",
        "rank_ratio=0.25",
        "--out",
        str(out),
    )
    assert code == 0, err
    merged = CLIPModel.from_pretrained(out).state_dict()
    reread = [load_state_dict(p) for p in paths]
    selected = {k for k in reread[0] if LowRankSelection().selects(k, reread[0][k].shape)}
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in selected
    expected = reference_cart(reread, 0.25, 1.0, selected)
    for key, value in base.state_dict().items():
        if key in expected:
            torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-4, atol=1e-5)
        else:  # text tower, projections, logit scale: the base's
            assert torch.equal(merged[key], value), key
    assert (out / "config.json").is_file()


def test_an_open_clip_merge_folder_loads_in_open_clip(open_clip_models, tmp_path):
    import open_clip

    _, paths, _ = open_clip_models
    out = tmp_path / "merged"
    code, stdout, err = merge(
        "--method",
        "average",
        "--finetuned",
        *map(str, paths[1:]),
        "--out",
        str(out),
        "--model",
        "mergeflow-tiny-vit",
    )
    assert code == 0, err
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    merged = load_state_dict(out / "open_clip_model.safetensors")
    for key, value in model.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(value, merged[key]), key
    assert preprocess is not None
    assert "library_name: open_clip" in (out / "README.md").read_text()
