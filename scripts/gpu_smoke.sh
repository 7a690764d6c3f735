#!/usr/bin/env bash
# Quick GPU check: demo at the default size and at a DeepSeek-like size.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
run_dumped() {  # a Python module with a traceback dump if it takes longer than 45 s
  timeout 60 python3 -c "import faulthandler, runpy, sys; faulthandler.dump_traceback_later(45, exit=True); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')" "$@"
}
run_dumped examples.demo || echo "demo failed rc=$?"
run_dumped examples.demo --ranks 8 --tokens 256,1,0,200,256,17,64,128 --hidden 7168 --top-k 8 --experts 256 || echo "big demo failed rc=$?"
timeout 90 python3 -m bench.profile.kernel_report || echo "kernel report failed rc=$?"
