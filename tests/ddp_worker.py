"""A data-parallel worker for tests/test_distributed.py: `python tests/ddp_worker.py RANK WORLD RENDEZVOUS OUT`.

Trains each architecture on its rank's share of a fixed float64 dataset and saves the results to OUT.
"""

import os
import sys

import torch
import torch.distributed as dist

from sae.config import SAEConfig, TrainConfig
from sae.distributed import Collectives, ProcessGroupCollectives, global_kth_largest
from sae.registry import get_architecture
from sae.training.streams import make_stream
from sae.training.trainer import Trainer

ARCHS = ("topk", "mutual_choice", "feature_choice")
B, D, F, K, STEPS = 64, 12, 48, 3, 6


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(B * STEPS, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, D).double()


def _train(arch: str, coll: Collectives) -> Trainer:
    cfg = SAEConfig(arch=arch, d_in=D, n_features=F, k=K, threshold_start_step=0)
    sae = get_architecture(arch)(cfg, seed=5).double()
    stream = make_stream(_data(), None, B, True, 2, coll.rank, coll.world_size)
    train_cfg = TrainConfig(
        batch_size=B, progress=False, warmup_steps=0, dead_tokens=B, k_aux=5, geometric_median_rows=2 * B,
        aux_loss="aux_zipf" if arch == "mutual_choice" else None, prefetch_batches=0,
        calibration_rows=0,  # compare the training state: the calibration pass afterwards runs on rank 0 alone
    )
    trainer = Trainer(sae, stream, train_cfg, collectives=coll)
    trainer.run()
    return trainer


def main(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        coll = ProcessGroupCollectives()
        results = {}
        for arch in ARCHS:
            trainer = _train(arch, coll)
            results[arch] = {
                "state": trainer.sae.state_dict(),
                "tokens_since_fired": trainer.tracker.tokens_since_fired,
                "density_ema": trainer.tracker.density_ema,
            }
        # ranks hold 0..9 and 10..19: the 4th largest of the union is 16
        kth = global_kth_largest((torch.arange(10.0) + 10 * rank).view(2, 5), 4, coll)
        results["kth"] = kth
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    os._exit(0)  # as experiments.train: skip finalisation, where gloo's threads can abort the process
