"""Tiny real instances of the checkpoint formats users hold, built offline from configs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import finetune_like

from mergeflow.hf_clip import from_open_clip


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def llama(state=None, dtype=torch.float32, seed=0):
    from transformers import LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config()).to(dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def save_word_tokenizer(folder: Path) -> None:
    """A real (tiny) fast tokenizer, as a model folder carries one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "merge": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


def llama_folders(root: Path, num_tasks: int = 3, dtype=torch.bfloat16, shard="20KB"):
    """A base Llama and ``num_tasks`` fine-tuned copies, each a folder as transformers saves
    it (bf16 safetensors shards + index, config.json, generation_config.json); the base
    folder has a tokenizer too. Returns (folders, states)."""
    base = llama(dtype=dtype)
    states = [base.state_dict()] + finetune_like(base.state_dict(), num_tasks, strength=0.05)
    folders = []
    for i, state in enumerate(states):
        folder = root / ("base" if i == 0 else f"task{i}")
        llama(state, dtype).save_pretrained(folder, max_shard_size=shard)
        folders.append(folder)
    save_word_tokenizer(folders[0])
    return folders, [{k: v.clone() for k, v in s.items()} for s in states]


def lora_adapters(root: Path, base_folder: Path, specs: list[dict], seed: int = 0):
    """PEFT LoRA adapters of the Llama in ``base_folder``, one per entry of ``specs``
    (LoraConfig settings), with random non-zero factors (a fresh adapter's B is zero)."""
    import peft
    from transformers import LlamaForCausalLM

    quiet_transformers()
    folders = []
    for i, settings in enumerate(specs):
        model = LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        adapted = peft.get_peft_model(model, peft.LoraConfig(**settings))
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_" in name:
                    param.copy_(0.2 * torch.randn(param.shape, generator=gen))
        folder = root / f"adapter{i}"
        adapted.save_pretrained(folder)
        folders.append(folder)
    return folders


def lora_delta(folder: Path, module: str) -> torch.Tensor:
    """ΔW = scale · B A of ``module`` in the adapter at ``folder``, float64, from its files."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    factors = load_file(str(folder / "adapter_model.safetensors"))
    a = factors[f"base_model.model.{module}.lora_A.weight"].double()
    b = factors[f"base_model.model.{module}.lora_B.weight"].double()
    r = a.shape[0]
    scale = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
    return scale * b @ a


def hub_cache(root: Path, repo: str, source: Path) -> tuple[Path, str]:
    """A Hugging Face hub cache holding ``source``'s files as a snapshot of ``repo`` (the
    layout ``huggingface_hub`` keeps: models--ORG--NAME/snapshots/COMMIT, refs/main).
    Returns (cache folder, commit)."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return root, commit


# --- CLIP -----------------------------------------------------------------------------------


def hf_clip_config(quick_gelu: bool = True, **vision):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act="quick_gelu" if quick_gelu else "gelu",
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu" if quick_gelu else "gelu",
            **vision,
        ),
        projection_dim=16,
    )


def hf_clip(config=None, seed: int = 0):
    from transformers import CLIPModel

    quiet_transformers()
    torch.manual_seed(seed)
    return CLIPModel(config or hf_clip_config()).eval()


def save_clip_tokenizer(folder: Path) -> None:
    """CLIP's own BPE (the vocabulary open_clip ships) as a transformers CLIPTokenizer's
    files, as a hub CLIP folder holds them (vocab.json, merges.txt, tokenizer config)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    clip = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({names.get(k, k): v for k, v in clip.encoder.items()})
    )
    merges = sorted(clip.bpe_ranks, key=clip.bpe_ranks.get)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def hf_clip_config_for_open_clip(model_cfg: dict):
    """The transformers CLIPConfig of an open_clip model config (plain CLIP towers)."""
    from transformers import CLIPConfig

    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    v_heads = vision["width"] // vision.get("head_width", 64)
    return CLIPConfig(
        text_config=dict(
            vocab_size=text.get("vocab_size", 49408),
            hidden_size=text["width"],
            intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
            num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=text.get("context_length", 77),
            hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=vision["width"],
            intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4.0)),
            num_hidden_layers=vision["layers"],
            num_attention_heads=v_heads,
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act=act,
        ),
        projection_dim=model_cfg["embed_dim"],
    )


def save_hf_clip_folder(state: dict, config, folder: Path) -> None:
    """An open_clip or transformers CLIP state dict saved as a transformers CLIPModel
    folder (config.json + model.safetensors), through transformers itself."""
    from transformers import CLIPModel

    quiet_transformers()
    model = CLIPModel(config)
    names = from_open_clip(state) if "visual.conv1.weight" in state else state
    missing, unexpected = model.load_state_dict(names, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    model.save_pretrained(folder)


def save_hf_vision_file(state: dict, path: Path) -> None:
    """The vision tower alone, as FusionBench's fine-tuned CLIPVisionModel files hold it."""
    from safetensors.torch import save_file

    names = from_open_clip(state) if "visual.conv1.weight" in state else state
    save_file(
        {k: v.contiguous() for k, v in names.items() if k.startswith("vision_model.")}, str(path)
    )


IMAGE_ENCODER = '''
import torch, open_clip

MARKER = {marker!r}


class ImageEncoder(torch.nn.Module):
    """The task-vectors papers' image encoder: an open_clip CLIP without its text
    transformer, plus the preprocessing objects (pickled with it)."""

    def __init__(self, config, state):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = (
            open_clip.create_model_and_transforms(config)
        )
        self.model.load_state_dict(state)
        delattr(self.model, "transformer")
        self.cache_dir = "/nonexistent"

    def __setstate__(self, state):
        open(MARKER, "w").write("ImageEncoder code ran")
        super().__setstate__(state)

    def forward(self, images):
        return self.model.encode_image(images)
'''

SAVE_ENCODERS = """
import sys, torch, open_clip
from safetensors.torch import load_file, save_file
sys.path.insert(0, {code!r})
open_clip.add_model_config({configs!r})
from src.modeling import ImageEncoder
for source, module_file, state_file, names_file in {jobs!r}:
    encoder = ImageEncoder({config!r}, load_file(source))
    torch.save(encoder, module_file)              # the papers' checkpoints: a whole module
    torch.save(encoder.state_dict(), state_file)  # the same as a state dict
    save_file({{k: v.contiguous() for k, v in encoder.state_dict().items()}}, names_file)
"""


def task_vectors_checkpoints(root: Path, config: str, sources: list[Path]):
    """Each open_clip checkpoint in ``sources`` saved the task-vectors way, by a separate
    process that has their ``src.modeling.ImageEncoder`` (this one does not): a pickled
    module (``.pt``) and its ``.state_dict()`` (``.state.pt``), plus the state dict's tensors
    under its own names (``.names.safetensors``) to compare with. Returns (module files,
    state files, names files, the marker a run of the module's code would create)."""
    from mergeflow.models import CONFIG_DIR

    code = root / "code"
    (code / "src").mkdir(parents=True)
    marker = root / "the-image-encoder-code-ran"
    (code / "src" / "__init__.py").write_text("")
    (code / "src" / "modeling.py").write_text(IMAGE_ENCODER.format(marker=str(marker)))
    jobs = [
        (
            str(s),
            str(root / f"{s.stem}.pt"),
            str(root / f"{s.stem}.state.pt"),
            str(root / f"{s.stem}.names.safetensors"),
        )
        for s in sources
    ]
    script = SAVE_ENCODERS.format(code=str(code), configs=str(CONFIG_DIR), jobs=jobs, config=config)
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=300)
    marker.unlink(missing_ok=True)  # the saving process may construct; loading must not run
    return (
        [Path(j[1]) for j in jobs],
        [Path(j[2]) for j in jobs],
        [Path(j[3]) for j in jobs],
        (
            marker,
            code,
        ),
    )
