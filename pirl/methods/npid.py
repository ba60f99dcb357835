"""NPID / NPID++ (Wu et al. 2018): the memory-bank NCE on f(v_I) alone, i.e. PIRL with lambda = 0.

The paper's NPID uses 4,096 negatives and NPID++ 32,000 (``objective.num_negatives``); otherwise
they are the same method.  Views: the image view only.  Network: phi + PIRL's head f.
"""

from __future__ import annotations

from torch import Tensor, nn

from pirl import losses as L
from pirl.config import Config
from pirl.data.views import SampleViews
from pirl.methods.bank_objective import BankObjective
from pirl.methods.keys import need
from pirl.methods.pirl import ImageHead, unit
from pirl.trunk import build_trunk, trunk_dim


def views(cfg: Config) -> SampleViews:
    """The image view v_I alone."""
    return SampleViews(image=True)


class NPIDModel(nn.Module):
    """phi + f: forward(batch) -> {"z_img": f(v_I)} ``[B,D]``, unit norm."""

    def __init__(self, arch: str, small_stem: bool, embed_dim: int, width: int = 1,
                 mlp: bool = False) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem, width)
        self.f = ImageHead(trunk_dim(arch, width), embed_dim, mlp)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image = need(batch, "image", "npid", shape="[B,3,S,S]")
        return {"z_img": unit(self.f(self.trunk(image)))}  # [B,D]


def build_model(cfg: Config) -> NPIDModel:
    """NPID's network for ``cfg``, randomly initialised."""
    m = cfg.model
    return NPIDModel(m.arch, m.small_stem, m.embed_dim, m.width, m.head == "mlp")


class NPIDObjective(BankObjective):
    """``L(m_I, f(v_I))`` averaged over the batch: ``loss(out, batch)`` -> (scalar, detached
    terms ``loss``, ``loss_img``); then ``after_step`` writes f(v_I) into the bank."""

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        z_img = need(out, "z_img", "objective 'npid'", "the model output")  # f(v_I) [B,D]
        (term_img,) = self.nce_terms([z_img], batch)  # [B]
        total = L.pirl_objective(None, term_img, 0.0)  # Eq. 5 with lambda = 0
        return total, {"loss": total.detach(), "loss_img": total.detach()}

    def after_step(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        """m_I <- normalize(mu m_I + (1 - mu) f(v_I)), mu = objective.bank_momentum."""
        self.update_bank(need(out, "z_img", "objective 'npid'", "the model output"), batch)
