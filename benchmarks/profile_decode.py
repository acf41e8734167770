"""Launch the decode kernel a few times on one shape, for a profiler to attach to; or
count the instruction mix of its compiled code per variant.

    ncu --clock-control none --kernel-name regex:kvq_decode --launch-skip 2 --launch-count 1 \\
        python benchmarks/profile_decode.py --preset int4 --unpack join
    python benchmarks/profile_decode.py --ptx DIR --preset int8,int4 --unpack auto,bytes
    python benchmarks/profile_decode.py --sm90 DIR --preset int8,int4 --v-token-minor --vary "block_k=64"
    python benchmarks/profile_decode.py --sm90 DIR --preset int8,int4 --paged 64 --batch 16 --seq 4096

Builds a B x S cache of random keys/values in the preset's format and runs
``kvq.attend(impl="pallas")`` ``--launches`` times (the first compiles); with
``--v-token-minor``, the kernel over the body with the values stored tokens-minor, as the
serving engine's pools hold them; with ``--paged PAGE``, through a shuffled page table with the
pools' value layout and the paged launch config, as the engine runs it. Queries have 4 rows per KV
head (Hq 32, Hkv 8), as decode. With ``--ptx``,
each (preset, unpack) is compiled with an XLA dump under DIR instead, and the kernel's
PTX is counted: tensor-core ops (``mma.sync`` / ``wgmma``), shared-memory traffic
(``st.shared``, ``ld.shared``, ``ldmatrix``, ``cp.async``), global loads, conversions
and shuffles; plus registers and spills from ``ptxas -v`` when ptxas is found.

``--sm90`` needs no GPU: the kernel's Triton IR (as the Pallas lowering hands it to XLA) is
compiled for sm_90 by the ``triton`` package (``pip install triton``; not a dependency of the
library), and the same counts are printed for the whole kernel and for its block loop (the
longest backward branch of the PTX: per-block instruction mix, the issue budget of a block),
with ptxas's registers and the loop's SASS opcodes (the instructions the SMs issue). XLA compiles the IR with its own Triton build, so numbers can differ a
little from the GPU's (int4 tokens-minor: 168 registers both; int8: 120 here, 110 on the H200).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

# PTX mnemonics counted by --ptx (prefix match on the instruction)
PTX_OPS = ("mma.sync", "wgmma.mma_async", "ldmatrix", "stmatrix", "st.shared", "ld.shared", "cp.async",
           "ld.global", "cvt", "prmt", "lop3", "shfl", "bar.sync", "ex2")


def _ptx_entries(text: str) -> dict:
    """PTX text -> {entry name: body} for every ``.entry`` function."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(", text):
        start = m.end()
        depth, i = 0, text.index("{", start)
        j = i
        while True:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        out[m.group(1)] = text[i:j + 1]
    return out


def ptx_counts(body: str) -> dict:
    """Static instruction counts of one PTX function body (``PTX_OPS`` prefixes)."""
    ins = []
    for ln in body.splitlines():
        tok = ln.strip().split()
        if not tok or tok[0].startswith(("//", ".", "{", "}", "$")):
            continue
        if tok[0].startswith("@"):  # predicate guard: the mnemonic follows
            tok = tok[1:]
        if tok:
            ins.append(tok[0])
    return {op: sum(1 for x in ins if x.startswith(op)) for op in PTX_OPS} | {"total": len(ins)}


def _ptxas():
    found = shutil.which("ptxas")
    if found:
        return found
    import site

    for d in site.getsitepackages():
        hits = glob.glob(os.path.join(d, "nvidia", "cuda_nvcc", "bin", "ptxas"))
        if hits:
            return hits[0]
    return None


def ptxas_usage(ptx_file: str, entry: str, arch: str = "sm_90a") -> str:
    """``ptxas -v`` registers / spills line of ``entry`` ("" without ptxas)."""
    exe = _ptxas()
    if not exe:
        return ""
    r = subprocess.run([exe, f"-arch={arch}", "-v", "-o", os.devnull, ptx_file], capture_output=True, text=True)
    lines = r.stderr.splitlines()
    out, take = [], False
    for ln in lines:
        if "Compiling entry function" in ln:
            take = entry in ln
        elif take and ("registers" in ln or "spill" in ln):
            out.append(ln.split("info    :")[-1].strip())
    return "; ".join(out) or (r.stderr.strip().splitlines() or [""])[-1]


def loop_body(body: str) -> str:
    """The longest region of a PTX function body that a branch jumps back to the start of: the
    kernel's loop over the blocks of its split."""
    lines = body.splitlines()
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^\$(\w+):", ln.strip())
        if m:
            labels[m.group(1)] = i
    best = (0, -1)
    for i, ln in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+\$(\w+);", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return "\n".join(lines[best[0]:best[1] + 1])


def sass_loop_ops(sass: str) -> dict:
    """SASS (``cuobjdump -sass``) -> opcode counts of its longest backward-branch region, the
    kernel's block loop, most frequent first."""
    ins = []
    for ln in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    best = (0, -1)
    for addr, txt in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", txt)
        if m and int(m.group(1), 16) < addr and addr - int(m.group(1), 16) > best[1] - best[0]:
            best = (int(m.group(1), 16), addr)
    ops = {}
    for addr, txt in ins:
        if best[0] <= addr <= best[1]:
            op = re.sub(r"^@!?U?P\w+\s+", "", txt).split()[0]
            ops[op] = ops.get(op, 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def _triton_ir_passes(path: str, target) -> None:
    """Run Triton's own TTIR passes (canonicalize, combine: e.g. ``c + dot(a, b, 0)`` -> ``dot(a, b,
    c)``, ...) over the IR file in place: ``triton.compile`` starts after them for a ``.ttir`` file."""
    from triton._C.libtriton import ir
    from triton.compiler import make_backend

    backend = make_backend(target)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = ir.parse_mlir_module(path, ctx)
    mod.context = ctx  # as triton.compile sets it
    backend.make_ttir(mod, {}, None, target.arch)
    with open(path, "w") as fh:
        fh.write(str(mod))


def compile_sm90(presets, unpacks, vary, out_dir, batch, seq, v_token_minor=False, v_pairs=False, page_size=None):
    """Lower each (preset, unpack, overrides) for CUDA on this machine, compile its Triton IR for
    sm_90 with the ``triton`` package, write ``.ttir`` / ``.ttgir`` / ``.ptx`` under ``out_dir``
    and print and return the PTX counts of the kernel and of its block loop, with registers."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        raise SystemExit("--sm90: needs the triton package (pip install triton)")
    import jax
    from jax._src.pallas.triton import lowering  # private: where the kernel's Triton module is built

    captured = []
    build = lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        res = build(*args, **kwargs)
        captured.append(res.module.operation.get_asm(print_generic_op_form=True))
        return res

    target = GPUTarget("cuda", 90, 32)
    tools = {f: os.path.join(r, f) for r, _, fs in os.walk(os.path.dirname(triton.__file__))
             for f in fs if f in ("ptxas", "cuobjdump")}
    ptxas = tools.get("ptxas")
    rows = []
    lowering.lower_jaxpr_to_triton_module = spy
    try:
        for name in presets:
            for unpack in unpacks:
                for var in vary:
                    f, q, cache, cfg = _kernel_call(name, unpack, batch, seq, jax.random.key(0), v_token_minor,
                                                    interpret=False, overrides=var, v_pairs=v_pairs,
                                                    page_size=page_size)
                    captured.clear()
                    f.trace(q, cache).lower(lowering_platforms=("cuda",))
                    tag = re.sub(r"[^\w.-]+", "_", "-".join([name, unpack] + [f"{k}{v}" for k, v in var.items()]))
                    base = os.path.join(out_dir, tag)
                    with open(base + ".ttir", "w") as fh:
                        fh.write(captured[-1])
                    _triton_ir_passes(base + ".ttir", target)  # what XLA runs before the TritonGPU passes
                    k = triton.compile(base + ".ttir", target=target,
                                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                    for ext in ("ttgir", "ptx"):
                        with open(f"{base}.{ext}", "w") as fh:
                            fh.write(k.asm[ext])
                    regs, sass = "", {}
                    if ptxas:
                        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", "-o", base + ".cubin", base + ".ptx"],
                                           capture_output=True, text=True)
                        regs = "; ".join(ln.split("info    :")[-1].strip() for ln in r.stderr.splitlines()
                                         if "registers" in ln or "spill" in ln)
                        if "cuobjdump" in tools and os.path.exists(base + ".cubin"):
                            out = subprocess.run([tools["cuobjdump"], "-sass", base + ".cubin"], capture_output=True,
                                                 text=True).stdout
                            with open(base + ".sass", "w") as fh:
                                fh.write(out)
                            sass = sass_loop_ops(out)
                    [body] = _ptx_entries(k.asm["ptx"]).values()
                    row = dict(preset=name, unpack=unpack, vary=var, cfg=str(cfg), kernel=ptx_counts(body),
                               loop=ptx_counts(loop_body(body)), sass_loop=sass, ptxas=regs,
                               shared_bytes=k.metadata.shared)
                    rows.append(row)
                    print(f"{tag:28s} loop PTX: " + " ".join(f"{o}={n}" for o, n in row["loop"].items() if n)
                          + f" | {regs} | shared {k.metadata.shared} B", flush=True)
                    if sass:
                        print(f"{'':28s} loop SASS: total={sum(sass.values())} "
                              + " ".join(f"{o}={n}" for o, n in list(sass.items())[:16]), flush=True)
    finally:
        lowering.lower_jaxpr_to_triton_module = build
    return rows


def _kernel_call(name, unpack, batch, seq, key, v_token_minor=False, interpret=None, overrides=None, v_pairs=False,
                 page_size=None):
    """A B x S cache of random keys/values in preset ``name``, a query, and the jitted
    ``kvq.attend(impl="pallas")`` over them with ``choose_config``'s launch config
    (``unpack`` replaced unless None, then the Config fields of ``overrides``): ``(f, q, cache,
    cfg)``. With ``v_token_minor``, the kernel over the body with the values stored tokens-minor
    (and with ``v_pairs``, their tokens in pairs), as the serving pools hold them. ``interpret``:
    None runs the kernel compiled on a GPU and interpreted elsewhere. With ``page_size``, the kernel
    reads the body through a shuffled page table of pages of that size, values in the serving pools'
    layout (`decode.value_layout` "paged"), with the paged launch config: what the engine runs. The
    query has Hq 32 over Hkv 8 (4 rows per KV head, as decode)."""
    import jax
    import jax.numpy as jnp

    import kvq_jax as kvq
    from decode import build_cache, contiguous_body, paged_body, store_values, to_pages, value_layout
    from kvq_jax.kernels import decode

    spec = kvq.KVSpec.parse(name)
    cache = build_cache(spec, batch, seq, 8, 128, key)
    cfg = decode.choose_config(cache, 32 // 8, page_size)
    if unpack and unpack != "auto":
        cfg = dataclasses.replace(cfg, unpack=unpack)
    cfg = dataclasses.replace(cfg, **(overrides or {}))
    q = jax.random.normal(key, (batch, 1, 32, 128), jnp.bfloat16)
    if page_size:
        vt, vp = value_layout(spec, "paged")
        pools, table = to_pages(cache, page_size, key)
        pools = dict(pools, v=store_values(pools["v"], vt, vp))
        # the "cache" handed back is (pools, table, cache): f(q, it) and f.trace(q, it) as for the others
        f = jax.jit(lambda q, ptc: paged_body(q, *ptc, cfg, vt, vp, interpret))
        return f, q, (pools, table, cache), cfg
    if v_token_minor:
        cache = dataclasses.replace(cache, v=store_values(cache.v, True, v_pairs))
        return jax.jit(lambda q, c: contiguous_body(q, c, cfg, True, interpret, v_pairs)), q, cache, cfg
    return jax.jit(lambda q, c: kvq.attend(q, c, impl="pallas", config=cfg, interpret=interpret)), q, cache, cfg


def count_variants(presets, unpacks, out_dir, batch, seq, v_token_minor=False):
    """Compile each (preset, unpack) with XLA dumping into ``out_dir``; print and return the
    PTX instruction counts of the kernel in the files each compilation added."""
    import jax

    if jax.default_backend() != "gpu":
        raise SystemExit("--ptx: needs a GPU (the kernel's PTX is what XLA compiles for it)")
    rows = []
    key = jax.random.key(0)
    for name in presets:
        for unpack in unpacks:
            tag = f"{name}-{unpack}"
            f, q, cache, _ = _kernel_call(name, unpack, batch, seq, key, v_token_minor)
            before = set(glob.glob(os.path.join(out_dir, "*.ptx")))
            jax.block_until_ready(f(q, cache))
            new = sorted(set(glob.glob(os.path.join(out_dir, "*.ptx"))) - before)
            for path in new:
                with open(path) as fh:
                    text = fh.read()
                for entry, body in _ptx_entries(text).items():
                    if "kvq_decode" not in entry:
                        continue
                    c = ptx_counts(body)
                    row = dict(preset=name, unpack=unpack, entry=entry, file=os.path.basename(path), **c,
                               ptxas=ptxas_usage(path, entry))
                    rows.append(row)
                    print(f"{tag:18s} " + " ".join(f"{k}={v}" for k, v in c.items()) + f" | {row['ptxas']}",
                          flush=True)
            if not new:
                print(f"{tag:18s} no new PTX under {out_dir}", flush=True)
            del cache
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="int4", help="comma-separated with --ptx")
    ap.add_argument("--unpack", default=None, help="Config.unpack; default choose_config's (comma-separated with --ptx)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--launches", type=int, default=4)
    ap.add_argument("--v-token-minor", action="store_true",
                    help="the kernel over the body with values stored tokens-minor (as the serving pools)")
    ap.add_argument("--v-pairs", action="store_true",
                    help="with --v-token-minor and --sm90: sub-byte values' tokens in pairs (as the serving pools)")
    ap.add_argument("--paged", type=int, default=None, metavar="PAGE",
                    help="with --sm90 or a GPU run: the kernel through a page table of pages of PAGE tokens, values "
                         "in the serving pools' layout, with the paged launch config (as the engine runs it)")
    ap.add_argument("--ptx", default=None, help="folder: dump and count the compiled kernel's PTX per variant")
    ap.add_argument("--sm90", default=None,
                    help="folder: compile each variant for sm_90 here with the triton package (no GPU) and count "
                         "its PTX, whole and per block (use a small --batch / --seq: the shapes do not change the "
                         "code)")
    ap.add_argument("--vary", default="", help="with --sm90: Config overrides, as benchmarks/decode.py --vary")
    a = ap.parse_args(argv)
    if a.sm90:
        from decode import parse_vary

        os.makedirs(a.sm90, exist_ok=True)
        rows = compile_sm90(a.preset.split(","), (a.unpack or "auto").split(","), parse_vary(a.vary), a.sm90,
                            a.batch, a.seq, a.v_token_minor, a.v_pairs, a.paged)
        with open(os.path.join(a.sm90, "counts.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
        return
    if a.ptx:
        os.makedirs(a.ptx, exist_ok=True)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={a.ptx}"
                                   " --xla_dump_emitter_re=.*").strip()
        rows = count_variants(a.preset.split(","), (a.unpack or "auto").split(","), a.ptx, a.batch, a.seq,
                              a.v_token_minor)
        with open(os.path.join(a.ptx, "counts.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
        return

    import jax

    f, q, cache, cfg = _kernel_call(a.preset, a.unpack, a.batch, a.seq, jax.random.key(0), a.v_token_minor,
                                    page_size=a.paged)
    for _ in range(a.launches):
        jax.block_until_ready(f(q, cache))
    print(f"{a.preset} {cfg}: {a.launches} launches done")


if __name__ == "__main__":
    main()
