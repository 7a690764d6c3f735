"""The copy bandwidth of dispatch's traffic mix: each row read once and written to F places
(F = unique target ranks per token, ~5.3 for DeepSeek-V3 routing over 8 ranks), next to the plain
1 read : 1 write copy roofline. Bytes counted as read + written.

    python scripts/fanout_roofline.py
"""

import torch

from bench.harness import copy_roofline_gbps, time_region

rows, hidden = 8 * 4096, 7168
source = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
print(f"copy roofline (1 read : 1 write): {copy_roofline_gbps():.0f} GB/s")
for fanout in (1, 2, 4, 5, 6):
    target = torch.empty(fanout, rows, hidden, dtype=torch.bfloat16, device="cuda")
    us = time_region(lambda: target.copy_(source.unsqueeze(0).expand(fanout, rows, hidden)), 10)
    nbytes = (1 + fanout) * rows * hidden * 2
    print(f"1 read : {fanout} writes  {nbytes / us / 1e3:7.0f} GB/s  ({us:.0f} us)")
