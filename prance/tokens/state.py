"""The token set carried through the network, in both execution modes.

Physical mode holds only surviving tokens (``alive`` is None, token counts equal across the
batch). Masked mode keeps full-length tensors and marks survivors in ``alive``; removed
tokens are excluded from every later attention through a key mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class TokenState:
    """Tokens of a batch; index 0 is always the cls token.

    x:      ``[B, N, C]`` token features (the residual stream).
    size:   ``[B, N]`` float, how many original patches each token stands for (cls: 1).
            Sizes of the patch tokens always sum to the number of original patches.
    source: ``[B, N, P]`` bool or None, which original patches each token covers (the cls
            row is all False); tracked only when asked for (visualisation).
    alive:  ``[B, N]`` bool or None; masked mode only, False for removed tokens.
    """

    x: torch.Tensor
    size: torch.Tensor
    source: torch.Tensor | None = None
    alive: torch.Tensor | None = None

    @classmethod
    def start(cls, x: torch.Tensor, track_source: bool = False, masked: bool = False) -> "TokenState":
        """State right after patch embedding: every token of size 1, each its own source."""
        b, n, _ = x.shape
        size = torch.ones(b, n, dtype=x.dtype, device=x.device)
        source = None
        if track_source:
            eye = torch.eye(n - 1, dtype=torch.bool, device=x.device)
            source = torch.cat([torch.zeros(1, n - 1, dtype=torch.bool, device=x.device), eye]).expand(b, -1, -1)
        alive = torch.ones(b, n, dtype=torch.bool, device=x.device) if masked else None
        return cls(x, size, source, alive)

    @property
    def masked(self) -> bool:
        return self.alive is not None

    def num_patches(self) -> torch.Tensor:
        """``[B]`` surviving patch tokens (cls excluded)."""
        if self.alive is None:
            return torch.full((self.x.shape[0],), self.x.shape[1] - 1, dtype=torch.int64, device=self.x.device)
        return self.alive[:, 1:].sum(1)

    def attn_bias(self) -> torch.Tensor:
        """``[B, N]`` additive key bias: log(size) (proportional attention), -inf for removed tokens."""
        bias = self.size.log()
        if self.alive is not None:
            bias = bias.masked_fill(~self.alive, float("-inf"))
        return bias

    def with_x(self, x: torch.Tensor) -> "TokenState":
        return replace(self, x=x)
