"""Check SAELens compatibility both ways with the real sae-lens package (kept out of our dependencies).

    python3 -m venv /tmp/venv-saelens && /tmp/venv-saelens/bin/pip install torch==2.13.0 \
        && /tmp/venv-saelens/bin/pip install -c constraints.txt "sae-lens==6.54.*"
    PYTHONPATH=. /tmp/venv-saelens/bin/python benchmarks/saelens_roundtrip.py runs/demo/sae/*/

1. Each of our saved SAE folders loads with ``sae_lens.SAE.load_from_disk``; its encode/decode on real-scale
   random inputs match ours (latents are compared after our documented rescaling by the normalisation c).
2. SAELens TopK and JumpReLU SAEs saved with ``save_model`` load with ``sae.load`` and give SAELens' outputs.
"""

from __future__ import annotations

import sys
import tempfile

import torch

import sae as ours


def compare_folder(folder: str) -> float:
    from sae_lens import SAE as LensSAE

    mine = ours.load(folder)
    lens = LensSAE.load_from_disk(folder, device="cpu")
    torch.manual_seed(0)
    scale = float(mine.norm_scale)  # training ran on c*x, so real activations have norm ~ sqrt(d)/c
    x = (torch.randn(512, mine.cfg.d_in) + mine.b_dec.detach()) / scale
    with torch.no_grad():
        ours_recon = mine(x)
        lens_recon = lens.decode(lens.encode(x))
    rel = float((ours_recon - lens_recon).norm() / ours_recon.norm())
    print(f"{folder}: arch {mine.cfg.arch} -> SAELens {type(lens).__name__}; reconstruction rel. diff {rel:.2e}")
    return rel


def compare_lens_saved() -> float:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    worst = 0.0
    torch.manual_seed(1)
    pairs = ((TopKSAE, TopKSAEConfig(d_in=64, d_sae=256, k=8)), (JumpReLUSAE, JumpReLUSAEConfig(d_in=64, d_sae=256)))
    for cls, cfg in pairs:
        lens = cls(cfg)
        with torch.no_grad():
            for p in lens.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
            if hasattr(lens, "threshold"):
                lens.threshold.copy_(torch.rand_like(lens.threshold) * 0.1)
        with tempfile.TemporaryDirectory() as tmp:
            lens.save_model(tmp)
            mine = ours.load(tmp)
        x = torch.randn(256, 64)
        with torch.no_grad():
            a, b = lens.decode(lens.encode(x)), mine(x)
            za, zb = lens.encode(x), mine.encode(x)
        rel = float((a - b).norm() / a.norm())
        zrel = float((za - zb).norm() / za.norm())
        print(f"SAELens {cls.__name__} saved -> sae.load: reconstruction rel. diff {rel:.2e}, latents {zrel:.2e}")
        worst = max(worst, rel, zrel)
    return worst


def main(folders: list[str]) -> int:
    worst = max([compare_folder(f) for f in folders] + [compare_lens_saved()])
    print(f"worst relative difference: {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
