"""Instructions per weight in the sparse decode kernels' loops, from their sm_90 machine code (no GPU needed).

teal's GPU kernel has two designs (`bricks.routing.kernels.DESIGNS`): `predicated` runs its loop over every row
of the weight and issues the loads of the kept rows only; `gathered` lists the kept rows first and loops over
them alone. On an H200 the predicated kernel took tens of microseconds for a projection that read no weights
(`results/kernel_probe_h200.txt`): what a row costs besides its bytes. This script compiles both loops with
triton's own compiler for sm_90 (H100/H200), disassembles them with the `nvdisasm` that the triton wheel ships,
and counts the instructions of each innermost loop per weight element a thread handles in one pass: a count of
what the GPU has to issue, not a timing.

    python bench/kernel_sass.py      # results: bench/results/kernel_sass_sm90.txt
"""

import collections
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, not the interpreter's Python

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bricks.routing import kept_rows, kernels  # noqa: E402

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
# The launcher specializes arguments divisible by 16 (pointers from torch's allocator, the 7B shape's sizes):
# the compiled loop then loads 8 bf16 at a time. Without it this script would count a slower loop than runs.
ALIGNED = ("v_ptr", "w_ptr", "out_ptr", "idx_ptr", "val_ptr", "n_ptr", "K", "N", "stride_w")


def machine_code(fn, types: dict, constants: dict, num_warps: int) -> str:
    signature = {**types, **{name: "constexpr" for name in constants}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in types}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout


def innermost_loop(sass: str) -> list[str]:
    """The instructions of the innermost loop: from a label to a backward branch to it, enclosing no other loop."""
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line.strip())}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    inner = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    start, end = max(inner, key=lambda se: se[1] - se[0])
    return [m.group(1) for line in lines[start:end + 1] if (m := INSTRUCTION.search(line))]


def report(name: str, ops: list[str], elements: int):
    mix = collections.Counter(ops).most_common(6)
    print(f"{name}: {len(ops)} instructions for {elements} weights a thread -> {len(ops) / elements:.2f} a weight; "
          + ", ".join(f"{op} {n}" for op, n in mix), flush=True)


def main():
    print(f"# triton {triton.__version__}, sm_90; bf16 weights, threshold selection; innermost loop only")
    types = {"v_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "keep_ptr": "*i1", "counts_ptr": "*i64",
             "threshold": "fp32", "K": "i32", "N": "i32", "stride_w": "i32"}
    for n, k, iters, loops, warps in kernels.CONFIGS:
        if loops == 1:  # unrolled whole, no loop to count
            continue
        sass = machine_code(kernels._sparse_rows, types, {"USE_KEEP": False, "SILU_GATED": False, "COUNT_SLOT": 1,
                            "BLOCK_N": n, "BLOCK_K": k, "ITERS": iters, "LOOPS": loops}, warps)
        report(f"predicated {n}x{k}x{iters}, {loops} loops ({warps} warps), every row", innermost_loop(sass),
               n * k * iters // (32 * warps))
    types = {"idx_ptr": "*i32", "val_ptr": "*fp32", "n_ptr": "*i32", "w_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32",
             "stride_w": "i32", "N_CHUNKS": "i32"}
    for n, k, chunks, warps in kept_rows.CONFIGS:
        sass = machine_code(kept_rows._listed_rows, types, {"CHUNK": kept_rows.CHUNK, "CHUNKS": chunks, "BLOCK_K": k,
                            "BLOCK_N": n}, warps)
        report(f"gathered {n}x{k}, {chunks} chunks ({warps} warps), kept rows only", innermost_loop(sass),
               n * k // (32 * warps))


if __name__ == "__main__":
    main()
