"""The kvq-jax command: plan (exact numbers), demo and generate on a random model, bench on CPU."""

from __future__ import annotations

import json
import pathlib
import re
import runpy

import pytest

import kvq_jax as kvq
from kvq_jax.capacity import parse_bytes
from kvq_jax.cli import ByteTokenizer, main


def _residual_slots(spec: kvq.KVSpec) -> int:
    """bf16 residual slots per sequence, from KVSpec's docstring: residual + token_group - 1
    with per-channel keys, residual otherwise; none for an unquantized spec."""
    if not spec.quantized:
        return 0
    channel = spec.k.quantized and spec.k.axis == "channel"
    return spec.residual + (spec.token_group - 1 if channel else 0)


def test_plan_json_is_exact(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "131072",
               "--gpu-mem", "141GB", "--weights", "16GB", "--json", str(out)])
    assert rc == 0
    table = json.loads(out.read_text())
    assert set(table) == set(kvq.PRESETS)
    free = 141 * 10**9 - 16 * 10**9
    for name, row in table.items():
        spec = kvq.KVSpec.parse(name)
        bpt = kvq.bytes_per_token(name, 32, 8, 128)
        assert row["bytes_per_token"] == bpt
        fixed = (_residual_slots(spec) + spec.sinks) * 2 * 2 * 128 * 8 * 32  # bf16 K and V
        per_session = (131072 - spec.sinks) * bpt + fixed
        assert row["sessions"] == free // per_session
    assert table["bf16"]["bytes_per_token"] == 2 * 2 * 128 * 8 * 32  # 128 KiB: Llama-3-8B shape
    assert table["int8"]["sessions"] > table["bf16"]["sessions"]
    printed = capsys.readouterr().out
    for name, row in table.items():
        assert re.search(rf"^{re.escape(name)}\s+{row['bytes_per_token']:,}\s", printed, re.M)


def test_plan_counts_the_residual_window():
    # KIVI's bf16 window (128 + 31 slots) matters for short sessions
    p = kvq.plan_capacity(["int4-kivi"], num_layers=2, num_kv_heads=1, head_dim=64, context=256, memory=10**6)
    row = p["int4-kivi"]
    assert row["session_bytes"] == 256 * kvq.bytes_per_token("int4-kivi", 2, 1, 64) + 159 * 2 * 2 * 64 * 2
    assert row["sessions"] == 10**6 // row["session_bytes"]


def test_parse_bytes():
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5 MB") == 1_500_000
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_demo_random_weights_prints_the_table(capsys):
    rc = main(["demo", "--random-weights", "--max-new-tokens", "10", "--kv", "bf16,int2-kivi"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "top-1 vs bf16" in out and "KL vs bf16" in out and "wall time" in out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^(bf16|int2-kivi)\s+([\d,]+)\s+.*?\s([\d.]+)%\s+(\S+)$", out, re.M)}
    assert set(rows) == {"bf16", "int2-kivi"}
    assert int(rows["bf16"][0].replace(",", "")) == kvq.bytes_per_token("bf16", 2, 2, 64)
    assert int(rows["int2-kivi"][0].replace(",", "")) == kvq.bytes_per_token("int2-kivi", 2, 2, 64)
    assert float(rows["bf16"][1]) == 100.0 and float(rows["bf16"][2]) == 0.0
    assert float(rows["int2-kivi"][2]) > 0  # 2-bit keys and values change the distributions
    for preset in ("bf16", "int2-kivi"):
        assert f"[{preset}]" in out  # each continuation printed


def test_generate_random_weights_streams(capsys):
    rc = main(["generate", "--random-weights", "--kv", "int4-kivi", "--prompt", "Hello", "--max-new-tokens", "6",
               "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "tokens in" in captured.err and "int4-kivi" in captured.err


def test_bench_on_cpu_points_at_the_benchmark(capsys):
    assert main(["bench"]) == 2
    assert "benchmarks/decode.py" in capsys.readouterr().err


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_capacity_example_measures_what_it_computes(capsys):
    assert _example("capacity.py")["main"](["--context", "2048", "--budget", "64MB", "--presets", "bf16,int4-kivi"]) == 0
    rows = re.findall(r"^(bf16|int4-kivi)\s+[\d,]+\s+[\d.]+\s+([\d,]+)\s+[\d.]+\s+([\d,]+)$",
                      capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["bf16", "int4-kivi"]
    for _, computed, measured in rows:
        assert 0 < int(measured.replace(",", "")) <= int(computed.replace(",", ""))


def test_long_context_chat_example_keeps_the_cache(capsys):
    main_ = _example("long_context_chat.py")["main"]
    assert main_(["--random-weights", "--max-turns", "2", "--max-new-tokens", "4", "--chunk-tokens", "200",
                  "--max-len", "1024", "--kv", "int8"]) == 0
    held = [int(m.group(1)) for m in re.finditer(r"^\s+\d\s+\d+\s+\d+\s+(\d+)\s", capsys.readouterr().out, re.M)]
    assert len(held) == 2 and held[1] > held[0] > 0


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "héllo"}])
    ids = tok.encode(text)
    assert ids[0] == 256 and 257 in ids and tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhéllo\nassistant\n"


def test_eval_and_needle_subcommands_reach_their_tools(capsys):
    from kvq_jax import cli

    for tool in ("eval", "needle"):
        with pytest.raises(SystemExit) as e:
            cli.main([tool, "--help"])
        assert e.value.code == 0
        assert "--text" in capsys.readouterr().out
