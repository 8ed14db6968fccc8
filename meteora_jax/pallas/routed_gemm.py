"""The base linear with the routed adapters' delta in its epilogue: y = x @ W + h @ B_tile, one Mosaic GPU kernel.

Prefill tokens route in runs (a prompt's tokens of one task choose the same adapters), so a tile of neighbouring
tokens uses only a few adapters. Per tile of `tile_tokens` tokens the caller names those adapters' B rows as
`slots` [tiles, U] into a bank [M, rows, O] (the adapters' B [N, r, O] itself, U x r = 64), and gives the tokens'
routed intermediates h [T, 64] (x A of each slot's adapter times the token's routing coefficient for it, zero
where the token did not choose it). The kernel is a Hopper GEMM (warp-specialised TMA pipeline and wgmma, after
jax's example jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py, Apache-2.0) whose accumulator takes one more
wgmma, h_tile @ B_tile, before it is written. That step has a K step's shape ([tile, 64] @ [64, O_tile]), so it
is the pipeline's last step: the copy warpgroup gathers B_tile's rows slot by slot into the K steps' own buffers
while the K loop runs. So the adapters' delta costs no pass over [T, O], which a LoRA added by XLA does, B_tile
is never written to memory, and shared memory holds four steps in flight (bench/NOTES.md). The pipeline is
written by hand because jax's emit_pipeline takes no step with other sources.

Mosaic GPU, not the Triton lowering the other kernels use: its pipelined wgmma GEMM measured 1.01-1.04x XLA's
cuBLAS dot at 4096-16384 tokens (bench/results/base_gemm_forms.json); a Triton-lowered GEMM was not tried.
Off GPU the kernel runs in Mosaic GPU's interpret mode (`interpret=True`), which simulates its shared memory,
barriers and warpgroups on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from meteora_jax.lora_mixture import on_hopper

# The copy engine moves and wgmma reads 128-byte swizzled rows: 64 bfloat16 values.
SWIZZLE_BYTES = 128
LANE = 64
# Shared memory holds B_tile in groups of 8 rows: one slot's copy fills whole groups.
SLOT_ROW_GROUP = 8
# Warpgroups: two compute, one issuing the copies.
COMPUTE_WARPGROUPS = 2
INTERPRET_PROGRAMS = 2
# Each compute warpgroup stages its output's 64-column lanes in this many buffers: one lane's store to memory
# runs while the next is written (bench/NOTES.md).
OUTPUT_BUFFERS = 2
# An H100 program's shared memory (227 KiB).
SHARED_MEMORY_BYTES = 227 * 1024
# wgmma's widest output tile: one instruction's N.
MAX_TILE_N = 256
# planar_snake's minor dimension: bands of output tiles (the example's best order at 16384 tokens).
SNAKE_ALONG_OUTPUTS = 1


@dataclasses.dataclass(frozen=True)
class RoutedGemmBlockSizes:
    """tile_m x tile_n: one compute warpgroup's output tile; the two warpgroups of a program split its tile
    along `split` ("m": tokens, "n": outputs). stages: pipeline steps in flight. grid_tile_width: output tiles per band
    of the programs' snake order over the output. Measured on an H100: bench/NOTES.md."""

    # 64 x 256 tiles: the slots' B rows, gathered per output tile, cost ~2 us at 16384 tokens where 128 x 128
    # tiles (twice as many) took 73 us more than with B_tile gathered beforehand (bench/NOTES.md).
    tile_m: int = 64
    tile_n: int = 256
    stages: int = 4
    split: str = "m"
    grid_tile_width: int = 8

    def __post_init__(self):
        for name in ("tile_m", "tile_n"):
            value = getattr(self, name)
            if value < LANE or value % LANE:
                raise ValueError(f"{name}={value} must be a multiple of {LANE}")
        # The interpreter runs wider tiles; Mosaic GPU's lowering of one wgmma rejects them.
        if self.tile_n > MAX_TILE_N:
            raise ValueError(f"tile_n={self.tile_n} must be at most {MAX_TILE_N}, one wgmma's widest output")
        if self.split not in ("m", "n"):
            raise ValueError(f"split={self.split!r} must be 'm' or 'n'")
        if self.stages < 2 or self.grid_tile_width < 1:
            raise ValueError(f"stages={self.stages} must be >= 2 and grid_tile_width={self.grid_tile_width} >= 1")
        if self.shared_memory_bytes > SHARED_MEMORY_BYTES:
            raise ValueError(f"{self} needs {self.shared_memory_bytes} bytes of shared memory; a Hopper program "
                             f"has {SHARED_MEMORY_BYTES}: fewer stages or smaller tiles")

    @property
    def tile_k(self) -> int:
        """Inputs per K step: one swizzled lane, as wide as h, so the adapters' step fits the K steps' buffers."""
        return LANE

    @property
    def shared_memory_bytes(self) -> int:
        """The stages' x and W buffers and each compute warpgroup's output staging buffers, in bfloat16."""
        step = (self.tile_tokens + self.tile_outputs) * LANE
        return 2 * (self.stages * step + COMPUTE_WARPGROUPS * OUTPUT_BUFFERS * self.tile_m * LANE)

    @property
    def tile_tokens(self) -> int:
        """Tokens per program tile: the routing tile (h's rows that share one b_tile)."""
        return self.tile_m * (COMPUTE_WARPGROUPS if self.split == "m" else 1)

    @property
    def tile_outputs(self) -> int:
        return self.tile_n * (COMPUTE_WARPGROUPS if self.split == "n" else 1)


def slot_rows(bank, slots):
    """B_tile [tiles, 64, O]: each tile's slots' rows of the bank, one after the other."""
    tiles, _ = slots.shape
    return bank[slots].reshape(tiles, LANE, bank.shape[-1])


def routed_gemm_reference(x, w, h, bank, slots):
    """x @ W + h @ B_tile[tile of each token], float32 accumulation, in x's dtype."""
    b_tile = slot_rows(bank, slots)
    tiles, e, o = b_tile.shape
    t = x.shape[0]
    delta = jnp.einsum("GTE,GEO->GTO", h.reshape(tiles, t // tiles, e), b_tile,
                       preferred_element_type=jnp.float32).reshape(t, o)
    return (jnp.dot(x, w, preferred_element_type=jnp.float32) + delta).astype(x.dtype)


def check_shapes(x, w, h, bank, slots, blocks: RoutedGemmBlockSizes) -> None:
    """Readable errors for operands the kernel cannot tile."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x {x.shape} and w {w.shape} must be matrices [T, I] and [I, O]")
    t, i = x.shape
    if w.shape[0] != i:
        raise ValueError(f"x {x.shape} and w {w.shape} disagree on the input features")
    o = w.shape[1]
    if t % blocks.tile_tokens or o % blocks.tile_outputs or i % blocks.tile_k:
        raise ValueError(
            f"x {x.shape} @ w {w.shape} does not tile by {blocks.tile_tokens} tokens x {blocks.tile_outputs} "
            f"outputs x {blocks.tile_k} inputs"
        )
    tiles = t // blocks.tile_tokens
    if h.shape != (t, LANE) or bank.ndim != 3 or bank.shape[2] != o:
        raise ValueError(f"h {h.shape} must be [{t}, {LANE}] and the bank {bank.shape} [M, rows, {o}]")
    rows = bank.shape[1]
    if rows == 0 or LANE % rows or rows % SLOT_ROW_GROUP or slots.shape != (tiles, LANE // rows):
        raise ValueError(f"slots {slots.shape} must be [{tiles}, 64 // rows] with the bank's rows ({rows}) a multiple "
                         f"of {SLOT_ROW_GROUP} that divides 64")
    if not jnp.issubdtype(slots.dtype, jnp.integer) or bank.shape[0] == 0:
        raise ValueError(f"slots must be integers into a bank of at least one entry; got {slots.dtype} slots into a "
                         f"bank {bank.shape}")
    if len({x.dtype, w.dtype, h.dtype, bank.dtype}) != 1 or x.dtype != jnp.bfloat16:
        dtypes = ", ".join(str(v.dtype) for v in (x, w, h, bank))
        raise ValueError(f"x, w, h and the bank must all be bfloat16; got {dtypes}")


def _swizzled(columns: int):
    swizzle = plgpu.find_swizzle(columns * 16)
    return plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)


def _kernel(x_gmem, w_gmem, h_gmem, bank_gmem, slots_gmem, out_gmem, *, blocks: RoutedGemmBlockSizes):
    t, i = x_gmem.shape
    o = w_gmem.shape[1]
    tile_m, tile_n, stages = blocks.tile_m, blocks.tile_n, blocks.stages
    cta_m, cta_n = blocks.tile_tokens, blocks.tile_outputs
    m_iters, n_iters, k_iters = t // cta_m, o // cta_n, i // LANE
    # Each output tile takes k_iters K steps and then the adapters' step (h_tile, B_tile), which has a K step's
    # shape: it runs through the same buffers, and with no buffers of its own shared memory holds four steps.
    steps = k_iters + 1
    transforms = _swizzled(LANE)
    split_m = blocks.split == "m"
    slot_count, slot_rows_count = slots_gmem.shape[1], bank_gmem.shape[1]

    @functools.partial(
        pl.run_scoped,
        x_smem=plgpu.SMEM((stages, cta_m, LANE), x_gmem.dtype, transforms=transforms),
        w_smem=plgpu.SMEM((stages, LANE, cta_n), w_gmem.dtype, transforms=transforms),
        out_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, OUTPUT_BUFFERS, tile_m, LANE), out_gmem.dtype,
                            transforms=transforms),
        loaded=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # x's and W's copies
        adapters_loaded=plgpu.Barrier(num_arrivals=1 + slot_count, num_barriers=stages),  # h's and each slot's
        consumed=plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),
        collective_axes="wg",
    )
    def _scope(x_smem, w_smem, out_smem, loaded, adapters_loaded, consumed):
        wg = lax.axis_index("wg")

        def output_tile(loop_info):
            """The program's first pipeline step for this tile, and the tile's place in the output."""
            (linear,) = loop_info.index
            m_idx, n_idx = plgpu.planar_snake(linear, (m_iters, n_iters), SNAKE_ALONG_OUTPUTS, blocks.grid_tile_width)
            return loop_info.local_index * steps, m_idx, n_idx

        @pl.when(wg == COMPUTE_WARPGROUPS)
        def _copies():
            plgpu.set_max_registers(40, action="decrease")

            def reserve(step):
                """Step's buffer slot, once both compute warpgroups have consumed the step before it there."""
                slot = lax.rem(step, stages)

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])
                return slot

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="programs")
            def _tiles(loop_info):
                first_step, m_idx, n_idx = output_tile(loop_info)
                cta_rows = pl.ds(m_idx * cta_m, cta_m)
                cols = pl.ds(n_idx * cta_n, cta_n)

                @pl.loop(0, k_iters)
                def _k(k):
                    slot = reserve(first_step + k)
                    plgpu.copy_gmem_to_smem(x_gmem.at[cta_rows, pl.ds(k * LANE, LANE)], x_smem.at[slot],
                                            loaded.at[slot])
                    plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(k * LANE, LANE), cols], w_smem.at[slot], loaded.at[slot])

                slot = reserve(first_step + k_iters)
                plgpu.copy_gmem_to_smem(h_gmem.at[cta_rows], x_smem.at[slot], adapters_loaded.at[slot])
                # Every slot's index first, so their loads wait on memory together, not one after another.
                entries = [slots_gmem[m_idx, s] for s in range(slot_count)]
                for s, entry in enumerate(entries):
                    plgpu.copy_gmem_to_smem(bank_gmem.at[entry, :, cols],
                                            w_smem.at[slot, pl.ds(s * slot_rows_count, slot_rows_count)],
                                            adapters_loaded.at[slot])

            # The last steps' releases too: the program exits only once every barrier phase it began has completed.
            programs = lax.axis_size("programs")
            total = lax.div(m_iters * n_iters - lax.axis_index("programs") + programs - 1, programs) * steps
            for j in range(stages):
                step = total - stages + j

                @pl.when(step >= 0)
                def _():
                    plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

        @pl.when(wg < COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            wg_rows = pl.ds(wg * tile_m, tile_m) if split_m else slice(None)
            wg_cols = slice(None) if split_m else pl.ds(wg * tile_n, tile_n)

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="programs")
            def _tiles(loop_info):
                first_step, m_idx, n_idx = output_tile(loop_info)

                @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _acc(acc):
                    def step(k, barrier):
                        slot = lax.rem(first_step + k, stages)
                        plgpu.barrier_wait(barrier.at[slot])
                        plgpu.wgmma(acc, x_smem.at[slot, wg_rows], w_smem.at[slot, :, wg_cols])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[slot])

                    pl.loop(0, k_iters)(functools.partial(step, barrier=loaded))
                    step(k_iters, adapters_loaded)
                    out = acc[...].astype(out_gmem.dtype)
                    rows = pl.ds(m_idx * cta_m + (wg * tile_m if split_m else 0), tile_m)
                    first_col = n_idx * cta_n + (0 if split_m else wg * tile_n)
                    lanes = tile_n // LANE
                    for lane in range(lanes):
                        # Counted across tiles: with an odd number of lanes a tile's first lane must not take the
                        # buffer whose store, the previous tile's last, may still be reading it.
                        staging = out_smem.at[wg, lax.rem(loop_info.local_index * lanes + lane, OUTPUT_BUFFERS)]
                        plgpu.wait_smem_to_gmem(OUTPUT_BUFFERS - 1, wait_read_only=True)
                        staging[...] = out[:, lane * LANE:(lane + 1) * LANE]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(staging, out_gmem.at[rows, pl.ds(first_col + lane * LANE, LANE)])

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _interpret_params():
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:  # jax 0.10 keeps it private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def routed_gemm(x, w, h, bank, slots, *, blocks: RoutedGemmBlockSizes = RoutedGemmBlockSizes(),
                interpret: bool = False):
    """x @ w + h @ B_tile[tile of each token] in bfloat16 with float32 accumulation, differentiable in x, w, h and
    the bank.

    x [T, I], w [I, O], h [T, 64]; bank [M, rows, O] and slots [T // blocks.tile_tokens, 64 // rows] in [0, M):
    tile g's B_tile is bank[slots[g]] stacked (`slot_rows`); rows must be a multiple of 8 dividing 64 (the
    adapters' B at r = 8, 16, 32 or 64; other ranks pass their gathered B_tile as a bank of one slot per tile).
    T, O and I must tile by blocks.tile_tokens, blocks.tile_outputs and blocks.tile_k. Slots outside [0, M) are not
    checked (their values live on the device): the reference clamps them, the GPU's bulk copies would fill a slot
    past the bank with zeros."""
    check_shapes(x, w, h, bank, slots, blocks)
    if x.shape[0] == 0 or w.shape[1] == 0:
        return jnp.zeros((x.shape[0], w.shape[1]), x.dtype)
    if not interpret and not on_hopper():
        device = jax.devices()[0]
        found = f"{device.device_kind} (compute capability {getattr(device, 'compute_capability', 'none')})"
        raise ValueError(f"the routed GEMM of strategy 'fused' runs on a Hopper GPU (compute capability 9.0: H100, "
                         f"H200), or interpreted (interpret=True); found {found}. Strategy 'auto' or 'pallas' "
                         "runs anywhere")
    return _differentiable(x, w, h, bank, slots.astype(jnp.int32), blocks, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _differentiable(x, w, h, bank, slots, blocks, interpret):
    return _call(x, w, h, bank, slots, blocks, interpret)


def _forward(x, w, h, bank, slots, blocks, interpret):
    return _call(x, w, h, bank, slots, blocks, interpret), (x, w, h, bank, slots)


def _backward(blocks, interpret, residuals, g):
    # The backward's products are plain XLA matmuls of the same size as the forward's, B_tile gathered again;
    # XLA drops the ones nothing uses (w's and the bank's while only the gates train).
    x, w, h, bank, slots = residuals
    _, vjp = jax.vjp(lambda x, w, h, bank: routed_gemm_reference(x, w, h, bank, slots), x, w, h, bank)
    return (*vjp(g), None)


_differentiable.defvjp(_forward, _backward)


def program_count(interpret: bool) -> int:
    """Persistent programs: one per streaming multiprocessor of the GPU."""
    return INTERPRET_PROGRAMS if interpret else jax.devices()[0].core_count


def _call(x, w, h, bank, slots, blocks, interpret):
    t, o = x.shape[0], w.shape[1]
    programs = program_count(interpret)
    return plgpu.kernel(
        functools.partial(_kernel, blocks=blocks),
        out_type=jax.ShapeDtypeStruct((t, o), x.dtype),
        grid=(programs,),
        grid_names=("programs",),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else False,
    )(x, w, h, bank, slots)
