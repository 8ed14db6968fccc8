"""The GPU benchmarks' plumbing on the CPU: the committed tables, a smoke run of the layer benchmark, arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_results_md_is_what_the_committed_json_gives():
    import results_tables

    assert results_tables.render() == (BENCH / "RESULTS.md").read_text(), "run python bench/results_tables.py"


def test_layer_benchmark_smoke_run_with_bfloat16_gates(tmp_path):
    out = tmp_path / "layer.json"
    subprocess.run([sys.executable, str(BENCH / "meteora_layer.py"), "--smoke", "--variants", "dense,pallas",
                    "--gate-dtype", "bfloat16", "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["gate_dtype"] == "bfloat16" and report["targets"]
    variants = {(r["in_features"], r["out_features"], r["adapters"], r["tokens"], r["variant"]): r
                for r in report["results"]}
    cases = {key[:4] for key in variants}
    assert len(cases) == 9
    for case in cases:
        for variant in ("base", "lora", "dense", "pallas"):
            row = variants[(*case, variant)]
            assert row["status"] == "ok" and row["median_ms"] > 0, (case, variant)


def test_layer_benchmark_finds_the_largest_cublas_workspace():
    from meteora_layer import largest_cublas_workspace

    hlo = "\n".join([
        '%custom-call.1 = (bf16[1024,4096]{1,0}, s8[33554432]{0}) custom-call(bf16[1024,4096]{1,0} %x, '
        'bf16[4096,4096]{1,0} %w), custom_call_target="__cublas$gemm", backend_config={}',
        '%custom-call.2 = (f32[64,64]{1,0}, s8[4194304]{0}) custom-call(f32[64,64]{1,0} %a, f32[64,64]{1,0} %b), '
        'custom_call_target="__cublas$lt$matmul"',
        '%custom-call.3 = (bf16[64,64]{1,0}, s8[67108864]{0}) custom-call(s8[99999999]{0} %c), '
        'custom_call_target="mosaic_gpu"',  # another kernel's scratch is not a cuBLAS workspace
        '%custom-call.4 = (f32[8,8]{1,0}, s8[16]{0}) custom-call(s8[99999999]{0} %d), '
        'custom_call_target="__cublas$gemm"',  # operands are not outputs
    ])
    assert largest_cublas_workspace(hlo) == 33554432
    assert largest_cublas_workspace(hlo.splitlines()[2]) == 0


@pytest.mark.parametrize("flag,value", [("--gate-tiles", "256"), ("--gate-tiles", "256x"), ("--cases", "1:1024"),
                                        ("--warps", "four")])
def test_decode_tuning_names_a_malformed_argument(flag, value, capsys):
    import decode_tuning

    with pytest.raises(SystemExit) as exit_info:
        decode_tuning.main([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_tile_adapter_prototype_smoke_run_matches_the_reference(tmp_path):
    out = tmp_path / "tile.json"
    subprocess.run([sys.executable, str(BENCH / "tile_adapters.py"), "--smoke", "--out", str(out)], check=True,
                   capture_output=True)
    rows = {r["slots"]: r for r in json.loads(out.read_text())["results"]}
    assert rows[2]["tiles_in_second_pass"] > 0  # the second pass runs, and is exact too
    for r in rows.values():
        assert r["tiles_over_two_passes"] == 0.0 and r["rel_error_of_delta"] < 1e-2
