"""A faithful re-implementation of the authors' released taming loop (``taming_an_identity.py``).

Used only by ``benchmarks/tame.py`` as the baseline flowtame is measured against. It reproduces, per
iteration, exactly the work and the defects that ``shared/design/taming.md`` documents:
1. a no-grad pass over all of D_F (fresh noise) to test the stopping criterion |d| < epsilon;
2. a forget batch (<= batch_size images of D_F) forward + backward of alpha * mean sigmoid(Δ_bpd²);
3. a no-grad forward of a frozen copy of the base model on the remember batch, N_B fitted on those images;
4. the tamed model's forward + backward on the same remember batch,
   (1 - alpha) * ((1 - gamma) * mean BPD + gamma * (KL(N_B||N_T) + KL(N_T||N_B))),
   with each KL's log term computed by Python's math.log on detached values (no gradient);
5. another no-grad pass over D_F for logging; every ``refresh_every`` iterations mu_R, sigma_R (BPD)
   re-estimated on ``refresh_size`` random remember images.
Then one Adam step. Statistics are in BPD, as in the authors' code.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from flowtame.data.quantization import discrete_nll, nats_to_bpd, quantize


@dataclass
class ReferenceResult:
    iterations: int
    converged: bool
    wall_seconds: float
    final_max_abs_d: float


def _bpd(model, pixels, n_bits, generator):
    x = quantize(pixels, n_bits) + torch.rand(pixels.shape, generator=generator) / 2 ** n_bits
    num_dims = pixels[0].numel()
    return nats_to_bpd(discrete_nll(model.log_prob(x), num_dims, n_bits), num_dims)


def _kl_no_log_grad(m_p, s_p, m_q, s_q):
    return math.log(s_q.item() / s_p.item()) + (s_p ** 2 + (m_p - m_q) ** 2) / (2 * s_q ** 2) - 0.5


def run_reference(model, forget, remember, n_bits, *, delta=4.0, epsilon=0.6, alpha=0.6, gamma=0.6, lr=5e-5,
                  batch_size=8, max_iters=800, refresh_every=10, refresh_size=1024, seed=0) -> ReferenceResult:
    """Tame ``model`` in place the authors' way; ``forget``/``remember`` are uint8 [N,C,H,W] tensors."""
    gen = torch.Generator().manual_seed(seed)
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def refresh():
        idx = torch.randperm(remember.shape[0], generator=gen)[:refresh_size]
        with torch.no_grad():
            bpd = torch.cat([_bpd(model, remember[idx[i:i + 256]], n_bits, gen) for i in range(0, len(idx), 256)])
        return bpd.mean(), bpd.std()

    mu, sigma = refresh()
    start = time.perf_counter()
    converged = False
    iteration = 0
    max_abs_d = float("inf")
    for iteration in range(1, max_iters + 1):
        with torch.no_grad():  # 1. stopping test on all of D_F, one fresh noise draw
            d = (_bpd(model, forget, n_bits, gen) - (mu + delta * sigma)) / sigma
        max_abs_d = d.abs().max().item()
        if max_abs_d < epsilon:
            converged = True
            break
        optimizer.zero_grad()
        idx = torch.randperm(forget.shape[0], generator=gen)[:batch_size]  # 2. forget batch
        gap = _bpd(model, forget[idx], n_bits, gen) - (mu + delta * sigma)
        (alpha * torch.sigmoid(gap.square()).mean()).backward()
        ridx = torch.randint(remember.shape[0], (batch_size,), generator=gen)
        with torch.no_grad():  # 3. frozen base copy on the remember batch
            base_bpd = _bpd(frozen, remember[ridx], n_bits, gen)
        tamed_bpd = _bpd(model, remember[ridx], n_bits, gen)  # 4. tamed forward + backward
        m_b, s_b, m_t, s_t = base_bpd.mean(), base_bpd.std(), tamed_bpd.mean(), tamed_bpd.std()
        kl = _kl_no_log_grad(m_b, s_b, m_t, s_t) + _kl_no_log_grad(m_t, s_t, m_b, s_b)
        ((1 - alpha) * ((1 - gamma) * tamed_bpd.mean() + gamma * kl)).backward()
        optimizer.step()
        with torch.no_grad():  # 5. logging pass over D_F
            _bpd(model, forget, n_bits, gen)
        if iteration % refresh_every == 0:
            mu, sigma = refresh()
    return ReferenceResult(iteration, converged, time.perf_counter() - start, max_abs_d)
