"""Run one DeepSeek-like simulated round on the GPU, then report each compiled kernel's vector
loads/stores, registers and spills from its PTX; the PTX files go to $OUT when it is set."""

import os

import a2a.kernels as kernels
from examples.demo import run

run(8, [256, 1, 0, 200, 256, 17, 64, 128], 7168, 8, 256, "cuda")
out_dir = os.environ.get("OUT")
for name in ("_route_kernel", "_dispatch_copy_kernel", "_stage_combine_kernel", "_combine_kernel", "_sanitize_kernel"):
    for cache in getattr(kernels, name).device_caches.values():
        for index, compiled in enumerate(cache[0].values()):
            ptx = compiled.asm["ptx"]
            print(f"{name}: v4 ld {ptx.count('ld.global.v4')}, v4 st {ptx.count('st.global.v4')}, "
                  f"b16 ld {ptx.count('ld.global.b16')}, regs {compiled.n_regs}, spills {compiled.n_spills}")
            if out_dir:
                with open(os.path.join(out_dir, f"{name}_{index}.ptx"), "w") as handle:
                    handle.write(ptx)
