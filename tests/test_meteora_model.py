"""MeteoRA inside the LLaMA model: parameter tree, strategies through the model, gradients, generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_reference import tiny_config

from meteora_jax.generate import generate
from meteora_jax.meteora import MeteoraConfig, MeteoraLinear
from meteora_jax.model import LlamaForCausalLM
from meteora_jax.routing import Routing
from meteora_jax.trainable import GATES_AND_ADAPTERS, merge_params, split_trainable

N, R = 4, 3


def meteora_model(targets=None, **kw):
    mcfg = MeteoraConfig(num_adapters=N, rank=R, **({"targets": targets} if targets else {}), **kw)
    config = tiny_config()
    model = LlamaForCausalLM(config, linear=MeteoraLinear(mcfg))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # B starts at zero (PEFT's init); random B makes the adapters matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(len(path)), x.shape, x.dtype) * 0.3
        if path[-1].key == "lora_b" else x, params)
    return config, model, params


def rel_error(ours, ref):
    return float(np.linalg.norm(np.asarray(ours) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)))


def test_parameter_tree_of_one_projection():
    _, _, params = meteora_model(targets=("q_proj", "down_proj"))
    q = jax.tree.map(lambda x: (x.shape, x.dtype.name), params["layers_0"]["self_attn"]["q_proj"])
    assert q == {
        "kernel": ((32, 32), "float32"),
        "meteora": {"lora_a": ((N, 32, R), "float32"), "lora_b": ((N, R, 32), "float32"),
                    "scaling": ((N,), "float32"), "gate": ((32, N), "float32")},
    }
    assert set(params["layers_0"]["self_attn"]["k_proj"]) == {"kernel"}
    assert params["layers_1"]["mlp"]["down_proj"]["meteora"]["lora_a"].shape == (N, 64, R)


@pytest.mark.parametrize("top_k", [1, 2, N])
def test_strategies_agree_through_the_model(rng, top_k):
    _, model, params = meteora_model()
    tokens = rng.integers(3, 97, (2, 7))
    ref, _ = model.apply({"params": params}, tokens, routing=Routing(strategy="loop", top_k=top_k, temperature=15.0))
    for strategy in ("bmm", "dense", "grouped", "pallas", "auto"):
        out, _ = model.apply({"params": params}, tokens,
                             routing=Routing(strategy=strategy, top_k=top_k, temperature=15.0))
        assert rel_error(out, ref) < 1e-5, strategy


def test_adapters_change_the_output_and_can_be_switched_off(rng):
    _, model, params = meteora_model()
    base_model = LlamaForCausalLM(tiny_config())
    tokens = rng.integers(3, 97, (1, 6))
    plain, _ = base_model.apply({"params": _strip_meteora(params)}, tokens)
    off, _ = model.apply({"params": params}, tokens, routing=Routing(adapters_off=True))
    on, _ = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(off, plain, rtol=1e-6, atol=1e-6)
    assert rel_error(on, plain) > 1e-3


def _strip_meteora(tree):
    return {k: _strip_meteora(v) for k, v in tree.items() if k != "meteora"} if isinstance(tree, dict) else tree


def lm_loss(model, params, tokens):
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))


def test_gradients_reach_the_gates_and_nothing_else(rng):
    _, model, params = meteora_model()
    tokens = jnp.asarray(rng.integers(3, 97, (2, 8)))
    gates, frozen = split_trainable(params)
    grads = jax.grad(lambda g: lm_loss(model, merge_params(g, frozen), tokens))(gates)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 2 * 7  # one gate per projection per layer
    assert all(path[-1].key == "gate" for path, _ in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for _, g in leaves)


def test_adapters_train_when_asked(rng):
    _, model, params = meteora_model()
    tokens = jnp.asarray(rng.integers(3, 97, (2, 8)))
    trainable, frozen = split_trainable(params, GATES_AND_ADAPTERS)
    grads = jax.grad(lambda t: lm_loss(model, merge_params(t, frozen), tokens))(trainable)
    names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(grads)}
    assert names == {"gate", "lora_a", "lora_b"}


def test_split_trainable_needs_a_meteora_tree():
    base_params = LlamaForCausalLM(tiny_config()).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    with pytest.raises(ValueError, match="is it a MeteoRA model"):
        split_trainable(base_params)


def test_generate_with_routing(rng):
    _, model, params = meteora_model()
    prompts = [rng.integers(3, 97, 5).tolist(), rng.integers(3, 97, 3).tolist()]
    forced = [generate(model, params, prompts, max_new_tokens=6, routing=Routing(force_adapter=j)).tokens
              for j in range(N)]
    assert len({str(f) for f in forced}) > 1
    routed = generate(model, params, prompts, max_new_tokens=6, routing=Routing(top_k=2, temperature=20.0))
    assert all(len(t) == 6 for t in routed.tokens)
    with pytest.raises(ValueError, match="no per-token routing assignment"):
        generate(model, params, prompts, max_new_tokens=2, routing=Routing(assignment=jnp.zeros((2, 5), int)))


def test_generate_marks_its_calls_inference_so_auto_may_take_fused(rng, monkeypatch):
    from meteora_jax import meteora

    offered = []

    def spy(*args):
        offered.append(args[4])  # fused_shape: offered only to calls marked inference
        return "auto"

    monkeypatch.setattr(meteora, "pick_strategy", spy)
    jax.clear_caches()  # the spy sees only calls traced now
    _, model, params = meteora_model(targets=("q_proj",))
    generate(model, params, [rng.integers(3, 97, 5).tolist()], max_new_tokens=2)
    assert offered and set(offered) == {(32, 32)}
    offered.clear()
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))  # a plain call may be differentiated
    assert offered == []


@pytest.mark.parametrize("gate_dtype", ["float32", "bfloat16"])
def test_generate_through_the_pallas_decode_kernels_matches_loop(rng, gate_dtype):
    from meteora_jax.meteora_checkpoint import cast_gates

    _, model, params = meteora_model()
    params = cast_gates(params, gate_dtype)
    prompts = [rng.integers(3, 97, 5).tolist(), rng.integers(3, 97, 3).tolist()]
    tokens = {s: generate(model, params, prompts, max_new_tokens=5, routing=Routing(strategy=s, top_k=2)).tokens
              for s in ("loop", "pallas")}
    assert tokens["pallas"] == tokens["loop"]


def test_bad_routing_settings():
    _, model, params = meteora_model()
    with pytest.raises(ValueError, match="force_adapter=9 is not an adapter index"):
        model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32), routing=Routing(force_adapter=9))
    with pytest.raises(ValueError, match="top_k=5 must be between 1"):
        model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32), routing=Routing(top_k=5))
    with pytest.raises(ValueError, match="unknown strategy"):
        Routing(strategy="magic")
    with pytest.raises(ValueError, match="unknown MeteoRA targets"):
        MeteoraConfig(num_adapters=2, rank=2, targets=("lm_head",))


def test_rematerialised_layers_give_the_same_gate_gradients(rng):
    from meteora_jax.training import loss_and_metrics

    config, model, params = meteora_model()
    remat_model = LlamaForCausalLM(config.replace(remat=True), linear=model.linear)
    tokens = jnp.asarray(rng.integers(3, 97, (2, 8)))
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens), "loss_mask": jnp.ones(tokens.shape, bool),
             "task_ids": jnp.asarray(rng.integers(0, N, tokens.shape))}
    gates, frozen = split_trainable(params)

    def grads(m):
        return jax.grad(lambda g: loss_and_metrics(m, merge_params(g, frozen), batch, 50.0)[0])(gates)

    for plain, remat in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(remat_model))):
        np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-7)


def test_bfloat16_dense_layer_with_folded_gate_matches_loop(rng):
    mcfg = MeteoraConfig(num_adapters=N, rank=R, strategy="dense")
    config = tiny_config().replace(dtype="bfloat16")
    model = LlamaForCausalLM(config, linear=MeteoraLinear(mcfg))
    _, _, params = meteora_model()
    # Every adapter mixed (top_k = N): with a top-2 pick, the two forms' bfloat16 roundings flip a near-tie in
    # about 1 input in 100 and that token's output moves by 10%. Gates scaled so their weights matter: uniform
    # weights would put the output 7% or more away from the loop's; the two forms differ by under 0.5%.
    params = jax.tree_util.tree_map_with_path(lambda p, x: x * 10 if p[-1].key == "gate" else x, params)
    tokens = rng.integers(3, 97, (2, 7))
    folded, state = model.apply({"params": params}, tokens, routing=Routing(top_k=N), mutable=["intermediates"])
    loop, _ = model.apply({"params": params}, tokens, routing=Routing(strategy="loop", top_k=N))
    assert rel_error(folded[0], loop) < 2e-2
    logits = state["intermediates"]["layers_0"]["mlp"]["up_proj"]["gate_logits"][0]
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7, N)


def test_compare_routing_counts_the_tokens_that_keep_their_adapters(rng):
    from meteora_jax.training import compare_routing

    _, model, params = meteora_model()
    tokens = rng.integers(3, 97, (2, 7))
    batch = {"tokens": tokens, "segment_ids": np.array([[1] * 7, [1] * 5 + [0] * 2]),
             "task_ids": np.array([[0] * 7, [2] * 5 + [-1] * 2])}
    same = compare_routing(model, params, params, batch)
    assert same["routing_agreement"].shape == (2 * 7,) and np.all(np.asarray(same["routing_agreement"]) == 1.0)
    # A negated gate of one projection reverses its ranking: its top 2 of 4 adapters become the other two.
    flipped = jax.tree_util.tree_map_with_path(
        lambda p, x: -x if p[-1].key == "gate" and p[0].key == "layers_1" and p[2].key == "q_proj" else x, params)
    found = jax.tree.map(np.asarray, compare_routing(model, params, flipped, batch))
    names = sorted("/".join(k[:-2]) for k in traverse_util.flatten_dict(params) if k[-1] == "gate")
    q = names.index("layers_1/self_attn/q_proj")
    assert found["routing_agreement"][q] == 0.0
    assert np.all(found["routing_agreement"][[i for i, n in enumerate(names) if n.startswith("layers_0")]] == 1.0)
    plain = LlamaForCausalLM(tiny_config())
    plain_params = plain.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="the model has no MeteoRA layers"):
        compare_routing(plain, plain_params, plain_params, batch)
    # The reversed gate's top-1 can no longer match a task the original gate got right.
    np.testing.assert_array_equal(found["gate_accuracy"], np.asarray(same["gate_accuracy"]))
    assert found["other_gate_accuracy"][q] <= 1.0 - found["gate_accuracy"][q] + 1e-6
