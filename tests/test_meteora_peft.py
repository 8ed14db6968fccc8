"""MeteoRA checkpoints from real peft adapters: forced routing equals peft, export round trip, bad adapters."""

import json
import re

import jax
import numpy as np
import pytest
import torch
from hf_reference import random_hf_model, tiny_config
from peft_reference import make_adapter, peft_logits
from safetensors.numpy import load_file, save_file

from convert.hf_lora_to_orbax import main as import_main
from convert.orbax_to_hf_lora import main as export_main
from meteora_jax.convert_llama import convert_llama
from meteora_jax.meteora_checkpoint import load_meteora, read_meteora
from meteora_jax.routing import Routing

# Float32 against peft on fresh random tokens: relative error median 6e-7, up to 1e-5 in 180 draws and 2e-5 once
# in CI (summation order); a wrong scaling, rank or routing shows at 1e-2 and more.
F32_TOLERANCE = 5e-5
ADAPTERS = {
    "full": dict(r=4, lora_alpha=8),
    "attention-only": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    "rslora-patterns": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 2},
                            alpha_pattern={"layers.1.self_attn.o_proj": 5}),
}


def rel_error(ours, ref):
    return float(np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("meteora")
    config = tiny_config()
    hf = random_hf_model(config, seed=11)
    hf.save_pretrained(root / "hf")
    convert_llama(root / "hf", root / "base", progress=False)
    dirs = {name: make_adapter(hf, root / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    args = ["--base", str(root / "base"), "--out", str(root / "meteora")]
    for name, path in dirs.items():
        args += ["--adapter", f"{name}={path}"]
    assert import_main(args) == 0
    return root, config, hf, dirs


def test_manifest_and_padded_rank(setup):
    root, *_ = setup
    tree, manifest = read_meteora(root / "meteora")
    assert [a["name"] for a in manifest["adapters"]] == list(ADAPTERS)
    assert manifest["rank"] == 8 and manifest["num_adapters"] == 3
    bank = tree["layers_0"]["mlp"]["up_proj"]["meteora"]
    assert bank["lora_a"].shape == (3, 32, 8) and bank["gate"].shape == (32, 3)
    # "attention-only" does not target the MLP: zero there, still a routing candidate.
    assert not np.any(np.asarray(bank["lora_b"][1])) and np.asarray(bank["scaling"])[1] == 0
    # rank 4 zero-padded to 8
    assert not np.any(np.asarray(bank["lora_a"][0, :, 4:]))


@pytest.mark.parametrize("index", range(len(ADAPTERS)))
def test_forced_adapter_equals_peft(setup, rng, index):
    root, config, hf, dirs = setup
    loaded = load_meteora(root / "base", root / "meteora")
    tokens = rng.integers(3, config.vocab_size, (2, 9))
    ours, _ = loaded.module.apply({"params": loaded.params}, tokens, routing=Routing(force_adapter=index))
    ref = peft_logits(hf, dirs[list(ADAPTERS)[index]], tokens)
    assert rel_error(ours, ref) < F32_TOLERANCE


def test_per_token_assignment_and_adapters_off(setup, rng):
    root, config, hf, dirs = setup
    loaded = load_meteora(root / "base", root / "meteora")
    tokens = rng.integers(3, config.vocab_size, (1, 6))
    with torch.no_grad():
        base = hf(torch.tensor(tokens)).logits.numpy()
    off, _ = loaded.module.apply({"params": loaded.params}, tokens, routing=Routing(adapters_off=True))
    assert rel_error(off, base) < F32_TOLERANCE
    nothing, _ = loaded.module.apply({"params": loaded.params}, tokens,
                                     routing=Routing(assignment=np.full((1, 6), -1)))
    assert rel_error(nothing, base) < F32_TOLERANCE
    all_zero, _ = loaded.module.apply({"params": loaded.params}, tokens,
                                      routing=Routing(assignment=np.zeros((1, 6), int)))
    assert rel_error(all_zero, peft_logits(hf, dirs["full"], tokens)) < F32_TOLERANCE
    past = np.full((1, 6), len(ADAPTERS))
    with pytest.raises(ValueError, match=f"assignment holds adapter {len(ADAPTERS)}; the adapter indices are"):
        loaded.module.apply({"params": loaded.params}, tokens, routing=Routing(assignment=past))
    jitted = jax.jit(lambda params, tokens, assignment: loaded.module.apply(
        {"params": params}, tokens, routing=Routing(assignment=assignment))[0])
    assert rel_error(jitted(loaded.params, tokens, past), base) < F32_TOLERANCE  # routes nowhere under jit


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_export_loads_in_peft_with_equal_logits(setup, rng, name):
    root, config, hf, dirs = setup
    out = root / f"export-{name}"
    assert export_main(["--meteora", str(root / "meteora"), "--adapter", name, "--out", str(out)]) == 0
    tokens = rng.integers(3, config.vocab_size, (1, 7))
    assert rel_error(peft_logits(hf, out, tokens), peft_logits(hf, dirs[name], tokens)) < F32_TOLERANCE


def test_gates_taken_from_another_checkpoint(setup):
    root, _, _, dirs = setup
    args = ["--base", str(root / "base"), "--out", str(root / "regated"), "--gates", str(root / "meteora"),
            "--seed", "5"]
    for name, path in dirs.items():
        args += ["--adapter", f"{name}={path}"]
    assert import_main(args) == 0
    old, new = read_meteora(root / "meteora")[0], read_meteora(root / "regated")[0]
    jax.tree.map(np.testing.assert_array_equal, old, new)


def test_routing_reports_gate_logits_per_layer(setup, rng):
    root, config, *_ = setup
    loaded = load_meteora(root / "base", root / "meteora")
    tokens = rng.integers(3, config.vocab_size, (2, 5))
    _, state = loaded.module.apply({"params": loaded.params}, tokens, mutable=["intermediates"])
    inter = state["intermediates"]
    logits = inter["layers_1"]["mlp"]["down_proj"]["gate_logits"][0]
    indices = inter["layers_1"]["mlp"]["down_proj"]["adapter_indices"][0]
    assert logits.shape == (2, 5, 3) and logits.dtype == np.float32
    assert indices.shape == (2, 5, 2)
    np.testing.assert_array_equal(indices, jax.lax.top_k(logits, 2)[1])


def copy_adapter(tmp_path, src, edit_config=None, edit_tensors=None):
    dst = tmp_path / "bad"
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "edit_config, edit_tensors, message",
    [
        (lambda c: c.update(peft_type="IA3"), None, "peft_type 'IA3' is not supported"),
        (lambda c: c.update(use_dora=True), None, "DoRA"),
        (lambda c: c.update(r=3), None, r"has lora_A \(4, \d+\) .* r=3 need"),
        (None, lambda t: t.update({FIRST_A: np.full_like(t[FIRST_A], np.nan)}), f"{FIRST_A}' contains NaN"),
        (None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)}),
         "lm_head.lora_A.weight' targets a module"),
        (None, lambda t: t.update({FIRST_A: np.zeros((4, 16), np.float32)}), "lora_A .4, 16."),
    ],
    ids=["ia3", "dora", "rank-mismatch", "nan", "lm-head", "dims"],
)
def test_bad_adapters_are_named_and_nothing_is_written(setup, tmp_path, capsys, edit_config, edit_tensors, message):
    root, _, _, dirs = setup
    bad = copy_adapter(tmp_path, dirs["full"], edit_config, edit_tensors)
    out = tmp_path / "out"
    assert import_main(["--base", str(root / "base"), "--adapter", f"broken={bad}", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "adapter 'broken'" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_bin_truncated_and_duplicate_adapters(setup, tmp_path, capsys):
    root, _, _, dirs = setup
    base = ["--base", str(root / "base"), "--out", str(tmp_path / "out")]
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_text((dirs["full"] / "adapter_config.json").read_text())
    (binary / "adapter_model.bin").write_bytes(b"")
    assert import_main(base + ["--adapter", f"old={binary}"]) == 1
    assert "convert it to safetensors" in capsys.readouterr().err

    truncated = copy_adapter(tmp_path, dirs["full"])
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert import_main(base + ["--adapter", f"cut={truncated}"]) == 1
    assert "adapter 'cut'" in capsys.readouterr().err

    assert import_main(base + ["--adapter", f"x={dirs['full']}", "--adapter", f"x={dirs['full']}"]) == 1
    assert "duplicate adapter names: ['x']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gates_from_a_checkpoint_of_other_adapters_are_refused(setup, capsys):
    root, _, _, dirs = setup
    args = ["--base", str(root / "base"), "--out", str(root / "swapped"), "--gates", str(root / "meteora")]
    for name in reversed(list(dirs)):
        args += ["--adapter", f"{name}={dirs[name]}"]
    assert import_main(args) == 1
    assert "same names in the same order" in capsys.readouterr().err
    assert not (root / "swapped").exists()


def test_bfloat16_gates_for_inference(setup, rng):
    root, config, *_ = setup
    f32 = load_meteora(root / "base", root / "meteora", dtype="bfloat16")
    bf16 = load_meteora(root / "base", root / "meteora", dtype="bfloat16", gate_dtype="bfloat16")
    changed = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (path[-1].key, a.dtype.name, b.dtype.name), f32.params, bf16.params)
    leaves = jax.tree_util.tree_leaves(changed, is_leaf=lambda v: isinstance(v, tuple))
    assert {leaf for leaf in leaves if leaf[1] != leaf[2]} == {("gate", "float32", "bfloat16")}
    tokens = rng.integers(3, config.vocab_size, (2, 5))
    logits = [
        loaded.module.apply({"params": loaded.params}, tokens, mutable=["intermediates"])[1]["intermediates"]
        ["layers_0"]["self_attn"]["q_proj"]["gate_logits"][0] for loaded in (f32, bf16)
    ]
    # The first gate sees the same input: the same logits up to the gate's rounding to 8 mantissa bits.
    assert 0 < np.linalg.norm(logits[1] - logits[0]) <= 2**-7 * np.linalg.norm(logits[0])
    with pytest.raises(ValueError, match="gate_dtype='float16'"):
        load_meteora(root / "base", root / "meteora", gate_dtype="float16")


def test_bfloat16_gates_are_not_saved(setup, tmp_path):
    from meteora_jax.meteora_checkpoint import cast_gates, save_meteora

    root, *_ = setup
    tree, manifest = read_meteora(root / "meteora")
    with pytest.raises(ValueError, match="the gate at layers_0/mlp/down_proj is bfloat16"):
        save_meteora(tmp_path / "out", cast_gates(tree, "bfloat16"), manifest)
    assert not (tmp_path / "out").exists()


def test_cast_gates_needs_a_meteora_tree():
    from meteora_jax.meteora_checkpoint import cast_gates

    with pytest.raises(ValueError, match="no MeteoRA gates"):
        cast_gates({"layers_0": {"mlp": {"up_proj": {"kernel": np.zeros((2, 2))}}}}, "bfloat16")
