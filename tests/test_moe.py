"""MC-SMoE's merge stage on a tiny Mixtral built from a config: routing statistics,
grouping, expert alignment, the usage-weighted merge and a smaller model transformers
loads."""

from __future__ import annotations

import json

import pytest
import torch

from mergeflow.errors import ParameterError
from mergeflow.moe import (
    LayerGroups,
    expert_permutation,
    group_experts,
    merge_experts,
    merge_layer,
    permute_expert,
    routing_statistics,
)


def tiny_mixtral(experts: int = 6, seed: int = 0, intermediate: int = 12):
    from formats import quiet_transformers
    from transformers import MixtralConfig, MixtralForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=80, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # a spread of router rows, so experts are used unevenly
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.experts.gate_up_proj.normal_(0, 0.3)
            layer.mlp.experts.down_proj.normal_(0, 0.3)
    return model


def sequences(count=12, length=20, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 80, (length,), generator=gen) for _ in range(count)]


def expert_output(gate_up, down, x):
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


def test_expert_permutation_is_function_preserving_and_found_by_matching():
    gen = torch.Generator().manual_seed(2)
    gate_up, down = torch.randn(24, 16, generator=gen), torch.randn(16, 12, generator=gen)
    order = torch.randperm(12, generator=gen)
    shuffled_up, shuffled_down = permute_expert(gate_up, down, order)
    x = torch.randn(5, 16, generator=gen)
    torch.testing.assert_close(
        expert_output(shuffled_up, shuffled_down, x), expert_output(gate_up, down, x)
    )
    # matching the shuffled copy onto the original undoes the shuffle
    back = expert_permutation((gate_up, down), (shuffled_up, shuffled_down))
    realigned = permute_expert(shuffled_up, shuffled_down, back)
    torch.testing.assert_close(realigned[0], gate_up)
    torch.testing.assert_close(realigned[1], down)


def test_grouping_keeps_the_most_used_and_joins_the_most_similar():
    usage = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    similarity = torch.eye(5)
    similarity[0, 3] = similarity[3, 0] = 0.9
    similarity[2, 1] = similarity[1, 2] = 0.8
    similarity[4, 3] = similarity[3, 4] = 0.7
    groups = group_experts(usage, similarity, 2)
    assert groups.groups == ((1, 2), (3, 4, 0))  # dominant first, groups by expert index
    assert groups.group_of().tolist() == [1, 0, 0, 1, 1]


def test_group_merge_is_usage_weighted_and_aligned():
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(3, 16, generator=gen)
    gate_up = torch.randn(3, 24, 16, generator=gen)
    down = torch.randn(3, 16, 12, generator=gen)
    # expert 2 is expert 0 with its hidden units shuffled: aligned, they merge to expert 0
    up2, down2 = permute_expert(gate_up[0], down[0], torch.randperm(12, generator=gen))
    gate_up[2], down[2] = up2, down2
    groups = LayerGroups(((0, 2), (1,)), torch.tensor([0.3, 0.5, 0.2]), torch.eye(3))
    new_gate, new_up, new_down = merge_layer(gate, gate_up, down, groups, align=True)
    torch.testing.assert_close(new_up[0], gate_up[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new_down[0], down[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new_gate[0], (0.3 * gate[0] + 0.2 * gate[2]) / 0.5)
    torch.testing.assert_close(new_up[1], gate_up[1])
    # without alignment the average of the two orders is another function
    _, unaligned_up, _ = merge_layer(gate, gate_up, down, groups, align=False)
    torch.testing.assert_close(unaligned_up[0], 0.6 * gate_up[0] + 0.4 * gate_up[2])
    assert not torch.allclose(unaligned_up[0], gate_up[0], atol=1e-3)


def test_routing_statistics_count_the_routers_selections():
    model = tiny_mixtral()
    calibration = sequences()
    stats = routing_statistics(model, calibration)
    assert len(stats) == 2
    for usage, similarity, top in stats:
        assert usage.shape == (6,) and float(usage.sum()) == pytest.approx(1.0)
        assert torch.allclose(similarity.diagonal(), torch.ones(6))
        assert ((similarity >= 0) & (similarity <= 1 + 1e-6)).all()
        assert len(top) == 12 * 20


def test_merging_into_fewer_experts_gives_a_model_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from mergeflow.moe import MoeMergeSpec, moe_merge

    model = tiny_mixtral()
    folder = tmp_path / "mixtral"
    model.save_pretrained(folder)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(json.dumps({"input_ids": s.tolist()}) for s in sequences()))
    out = tmp_path / "smaller"
    spec = MoeMergeSpec(model=str(folder), calibration=str(calibration), out=str(out), experts=3)
    report = moe_merge(spec, say=lambda line: None)
    smaller = AutoModelForCausalLM.from_pretrained(out)
    assert smaller.config.num_local_experts == 3
    assert smaller.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3
    assert report["parameters_after"] < report["parameters_before"]
    assert json.loads((out / "mergeflow_moe.json").read_text())["experts_after"] == 3
    for layer in report["layers"]:
        assert sorted(e for g in layer["groups"] for e in g) == list(range(6))
        assert 0.0 <= layer["routing_agreement"] <= 1.0
    ids = sequences(1)[0][None]
    with torch.no_grad():
        logits = smaller(input_ids=ids).logits
    assert logits.shape == (1, 20, 80) and torch.isfinite(logits).all()


def test_keeping_every_dominant_router_row_is_the_original_routing():
    """With groups of one (no expert merged away) the merge changes nothing: every layer's
    router and experts come back as they were (the smallest check of the bookkeeping)."""
    model = tiny_mixtral(experts=4)
    calibration = sequences(4)
    stats = routing_statistics(model, calibration)
    for block, (usage, similarity, _) in zip(model.model.layers, stats, strict=True):
        groups = group_experts(usage, similarity, 4)
        mlp = block.mlp
        gate, up, down = merge_layer(
            mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj, groups
        )
        torch.testing.assert_close(gate, mlp.gate.weight)
        torch.testing.assert_close(up, mlp.experts.gate_up_proj)
        torch.testing.assert_close(down, mlp.experts.down_proj)


def test_moe_merge_refuses_what_it_cannot_do(tmp_path):
    model = tiny_mixtral()
    with pytest.raises(ParameterError, match="at least the experts each token is routed to"):
        merge_experts(model, sequences(2), 1)
    with pytest.raises(ParameterError, match="fewer than the model's 6"):
        merge_experts(model, sequences(2), 6)
    from mergeflow.moe import read_calibration

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"text": "no ids"}\n')
    with pytest.raises(ParameterError, match="bad.jsonl: line 2 is not a JSON object"):
        read_calibration(str(bad), tmp_path, 10, 8)
    text = tmp_path / "samples.txt"
    text.write_text("hello world\n")
    with pytest.raises(ParameterError, match="needs the model folder's tokenizer"):
        read_calibration(str(text), tmp_path, 10, 8)


def test_moe_merge_from_the_cli_with_text_calibration(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from mergeflow.cli import main

    folder = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(folder)
    words = [f"w{i}" for i in range(78)]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(folder)  # fmt: skip
    text = tmp_path / "samples.txt"
    gen = torch.Generator().manual_seed(5)
    text.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, 78, (15,),
                    generator=gen)) for _ in range(8)))  # fmt: skip
    spec = tmp_path / "moe.yaml"
    spec.write_text(f"model: {folder}\ncalibration: {text}\nout: {tmp_path / 'out'}\nexperts: 4\n")
    assert main(["moe-merge", str(spec), "--no-align"]) == 0
    assert "6 → 4 experts per layer" in capsys.readouterr().out
    smaller = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert smaller.config.num_local_experts == 4
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["moe-merge", str(spec), "--experts", "0"]) == 2
    assert "experts: Input should be greater than 0" in capsys.readouterr().err


def test_a_legacy_mixtral_folder_is_read_through_transformers_conversion(tmp_path):
    """Folders saved before transformers fused the experts name each one:
    ``block_sparse_moe.experts.N.w1/w2/w3`` and ``block_sparse_moe.gate``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = tiny_mixtral()
    legacy = {}
    inner = model.config.intermediate_size
    for key, value in model.state_dict().items():
        if ".mlp.experts.gate_up_proj" in key:
            prefix = key.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(value.shape[0]):
                legacy[f"{prefix}.{e}.w1.weight"] = value[e, :inner].clone()
                legacy[f"{prefix}.{e}.w3.weight"] = value[e, inner:].clone()
        elif ".mlp.experts.down_proj" in key:
            prefix = key.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(value.shape[0]):
                legacy[f"{prefix}.{e}.w2.weight"] = value[e].clone()
        else:
            legacy[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value.clone()
    folder = tmp_path / "legacy"
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file(legacy, str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = sequences(1)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    smaller, report = merge_experts(loaded, sequences(4), 3)
    assert smaller.config.num_local_experts == 3 and report["experts_before"] == 6
    # a bf16 checkpoint gives a bf16 smaller model (not one twice its size); transformers'
    # bf16 expert kernel wants rows of a multiple of 16 bytes
    wide = tiny_mixtral(intermediate=16).to(torch.bfloat16)
    half, _ = merge_experts(wide, sequences(4), 3)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_the_merge_moe_flow_writes_the_smaller_model(prefect_harness, tmp_path):
    from transformers import AutoModelForCausalLM

    from flows.moe import merge_moe
    from mergeflow.moe import MoeMergeSpec

    folder = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(folder)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(json.dumps({"input_ids": s.tolist()}) for s in sequences()))
    spec = MoeMergeSpec(
        model=str(folder), calibration=str(calibration), out=str(tmp_path / "out"), experts=4
    )
    report = merge_moe(spec)
    assert report["experts_after"] == 4
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_local_experts == 4
