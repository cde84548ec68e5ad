"""C2C-style cache fuser: project a transmitter's KV cache into the receiver's and add it as a gated residual.

Split like PEFT: `FuserConfig` (the model pair and the shapes, JSON), `Projectors` (the per-layer K and V maps,
stacked to run as one batch), and `CacheFuser` (all layers, fuse, save/load). The fused cache is receiver + gate ·
head_weight · projection, with the projection's last layer zero-initialised, so an untrained fuser is exactly the
receiver alone and training starts from there.

Several transmitters into one receiver: each has its own `CacheFuser`; `residuals` computes one transmitter's
additions from the receiver's own cache, and `add_residuals` sums any set of them onto it (a participation mask
simply leaves a transmitter's residuals out).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from fedlm import atomic
from fedlm.kvcomm.align import LayerAlign, layer_map
from fedlm.kvcomm.wire import model_fingerprint
from fedlm.models.cache import cache_root
from fedlm.models.loader import LoadedModel

CONFIG_FILE = "fuser_config.json"
WEIGHTS_FILE = "fuser.safetensors"
KV = tuple[Tensor, Tensor]
TransmitterKV = Mapping[int, KV] | Sequence[KV | None]
Residuals = dict[int, KV]  # receiver layer -> (ΔK, ΔV), each [batch, kv_heads, rows, head_dim]


class FuserError(ValueError):
    """A fuser checkpoint that cannot serve this model pair."""


class FuserMismatchError(FuserError):
    """A fuser checkpoint was trained for another receiver/transmitter pair."""


def is_trained(folder: str | Path) -> bool:
    """Whether `folder` holds a saved fuser."""
    return (Path(folder) / CONFIG_FILE).is_file()


def kv_layout(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a model's KV cache."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


@dataclass
class FuserConfig:
    """Everything needed to rebuild a fuser and to check it is used with the pair it learned."""

    receiver: str
    transmitter: str
    receiver_fingerprint: str
    transmitter_fingerprint: str
    receiver_layers: int
    transmitter_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    transmitter_kv_heads: int
    transmitter_head_dim: int
    layer_map: list[int | None]
    hidden: int = 256
    align: LayerAlign = "last"
    extra: dict = field(default_factory=dict)  # free-form provenance (training figures), kept in the JSON

    @classmethod
    def for_pair(
        cls, receiver: LoadedModel, transmitter: LoadedModel, align: LayerAlign = "last", hidden: int = 256
    ) -> FuserConfig:
        r_layers, r_heads, r_dim = kv_layout(receiver.model)
        t_layers, t_heads, t_dim = kv_layout(transmitter.model)
        return cls(
            receiver=receiver.name,
            transmitter=transmitter.name,
            receiver_fingerprint=model_fingerprint(receiver),
            transmitter_fingerprint=model_fingerprint(transmitter),
            receiver_layers=r_layers,
            transmitter_layers=t_layers,
            receiver_kv_heads=r_heads,
            receiver_head_dim=r_dim,
            transmitter_kv_heads=t_heads,
            transmitter_head_dim=t_dim,
            layer_map=layer_map(r_layers, t_layers, align),
            hidden=hidden,
            align=align,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FuserConfig:
        return cls(**json.loads(text))


def gumbel_sigmoid(logit: Tensor, temperature: float) -> Tensor:
    """A relaxed Bernoulli sample: differentiable in `logit`, and sharper (closer to 0/1) as temperature falls."""
    u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logit + u.log() - (-u).log1p()) / temperature)


class Projectors(nn.Module):
    """One projector per slot (a fused receiver layer's K or V), all evaluated at once.

    Each slot maps (receiver heads, aligned transmitter heads) per token to a gated residual on the receiver's heads:
    both sides layer-normed (the two models' keys differ in scale by orders of magnitude: Gemma normalises its keys,
    llama does not), concatenated, then a 3-layer MLP whose output is weighed per head and by the slot's gate. K and V
    have slots of their own: keys carry rotary position and feed the dot product, values carry content, and one map
    would have to serve both geometries.

    The slots' weights are stacked, [slots, ...], and every slot's MLP runs in one batched matmul per layer of it
    (as MoE layers store their experts). Kept per slot as 240 small `nn.Linear` calls, SmolLM2's fuser took 15.6 ms
    on a 32-token question against 9.9 ms batched.
    """

    def __init__(self, slots: int, heads: int, head_dim: int, transmitter_dim: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim + transmitter_dim
        self.receiver_norm_weight = nn.Parameter(torch.ones(slots, heads * head_dim))
        self.receiver_norm_bias = nn.Parameter(torch.zeros(slots, heads * head_dim))
        self.transmitter_norm_weight = nn.Parameter(torch.ones(slots, transmitter_dim))
        self.transmitter_norm_bias = nn.Parameter(torch.zeros(slots, transmitter_dim))
        # weights are [slots, in, out], so x @ w needs no transpose; initialised as nn.Linear initialises its own
        self.w1, self.b1 = _linear(slots, width, hidden)
        self.w2, self.b2 = _linear(slots, hidden, hidden)
        self.w3, self.b3 = _linear(slots, hidden, heads * head_dim)
        nn.init.zeros_(self.w3)  # the residual starts at exactly zero: receiver-alone behaviour
        nn.init.zeros_(self.b3)
        self.head_w, self.head_b = _linear(slots, width, heads)
        # Starts open (sigmoid(1) ≈ 0.73) so the projection gets gradient; training may close it for good.
        self.gate_logit = nn.Parameter(torch.ones(slots))

    def gates(self, temperature: float) -> Tensor:
        """Gumbel-sigmoid while training; hard 0/1 by each logit's sign at inference."""
        if self.training:
            return gumbel_sigmoid(self.gate_logit, temperature)
        return (self.gate_logit > 0).to(self.gate_logit.dtype)

    def forward(self, slots: Tensor | None, receiver: Tensor, transmitter: Tensor, temperature: float) -> Tensor:
        """receiver [m, N, heads·head_dim] and transmitter [m, N, transmitter_dim] (token-aligned rows of the `m`
        slots listed in `slots`; None: every slot, in order) -> residuals [m, N, heads, head_dim]."""

        def take(parameter: Tensor) -> Tensor:
            return parameter if slots is None else parameter[slots]

        x = torch.cat(
            [
                _layer_norm(receiver, take(self.receiver_norm_weight), take(self.receiver_norm_bias)),
                _layer_norm(transmitter, take(self.transmitter_norm_weight), take(self.transmitter_norm_bias)),
            ],
            dim=-1,
        )
        h = nn.functional.gelu(torch.baddbmm(take(self.b1).unsqueeze(1), x, take(self.w1)))
        h = nn.functional.gelu(torch.baddbmm(take(self.b2).unsqueeze(1), h, take(self.w2)))
        projection = torch.baddbmm(take(self.b3).unsqueeze(1), h, take(self.w3))
        weights = torch.sigmoid(torch.baddbmm(take(self.head_b).unsqueeze(1), x, take(self.head_w)))  # per head
        gates = take(self.gates(temperature)).view(-1, 1, 1, 1)
        return gates * weights.unsqueeze(-1) * projection.view(*projection.shape[:2], self.heads, self.head_dim)


def _linear(slots: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Stacked weight [slots, fan_in, fan_out] and bias [slots, fan_out], uniform in ±1/sqrt(fan_in) like
    `nn.Linear`'s default."""
    bound = fan_in**-0.5
    weight = nn.Parameter(torch.empty(slots, fan_in, fan_out).uniform_(-bound, bound))
    bias = nn.Parameter(torch.empty(slots, fan_out).uniform_(-bound, bound))
    return weight, bias


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Layer norm over the last dimension with each slot's own affine ([m, N, d] with [m, d])."""
    return nn.functional.layer_norm(x, x.shape[-1:]) * weight.unsqueeze(1) + bias.unsqueeze(1)


class CacheFuser(nn.Module):
    """The fuser of one receiver/transmitter pair: a K and a V slot for each receiver layer that has a partner."""

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        self.config = config
        self.temperature = 1.0  # of the training gates; the training loop anneals it
        self.fused_layers = [r for r, t in enumerate(config.layer_map) if t is not None]
        self.projectors = Projectors(
            2 * len(self.fused_layers),
            config.receiver_kv_heads,
            config.receiver_head_dim,
            config.transmitter_kv_heads * config.transmitter_head_dim,
            config.hidden,
        )

    def residuals(
        self,
        receiver_cache: DynamicCache,
        transmitter_kv: TransmitterKV,
        token_map: Tensor,
        transmitter_len: int | None = None,
    ) -> Residuals:
        """What this transmitter adds to each fused receiver layer, computed from the receiver's own cache.

        `receiver_cache` covers exactly the context (one row per entry of `token_map`); `token_map[i]` is the
        transmitter token paired with receiver token i. `transmitter_kv` holds (K, V) by transmitter layer id
        ([batch, heads, tokens, dim], or without the batch as `KVPayload.kv` gives them), possibly a subset;
        receiver layers whose partner is missing get no residual. A sliding-window layer (on either side) may hold
        only its last rows, which stand for the last tokens of the context; `transmitter_len` (default: the
        longest layer sent) says how many tokens the transmitter read, so such rows line up, and a receiver token
        paired with a transmitter token that fell out of the window is left alone.
        """
        if receiver_cache.get_seq_length() != len(token_map):
            raise ValueError(
                f"the receiver cache covers {receiver_cache.get_seq_length()} tokens but the token map has "
                f"{len(token_map)}: fuse the context cache, before any generated token"
            )
        available = {t: kv for t, kv in _by_layer(transmitter_kv).items() if kv is not None}
        if transmitter_len is None:
            transmitter_len = max((k.shape[-2] for k, _ in available.values()), default=0)
        dtype = next(self.parameters()).dtype
        batch = receiver_cache.layers[0].keys.shape[0]
        # Each fused layer's inputs, grouped by how many rows its receiver layer holds (a sliding-window layer may
        # hold fewer than the rest), so that each group's K and V slots run through the projectors together.
        groups: dict[int, list[_LayerInputs]] = {}
        for i, r in enumerate(self.fused_layers):
            t = self.config.layer_map[r]
            if t not in available:
                continue
            layer = receiver_cache.layers[r]
            rows = layer.keys.shape[-2]
            pairs = token_map[len(token_map) - rows :].to(layer.keys.device)
            t_keys, t_values = (x if x.dim() == 4 else x[None] for x in available[t])  # a wire payload has no batch
            index = pairs - (transmitter_len - t_keys.shape[-2])  # row of each paired token in this layer
            inside = (index >= 0).to(dtype).view(1, 1, rows, 1)
            index = index.clamp(min=0)
            sent = (t_keys[:, :, index], t_values[:, :, index])
            groups.setdefault(rows, []).append(_LayerInputs(i, r, inside, (layer.keys, layer.values), sent))
        out: Residuals = {}
        every = list(range(2 * len(self.fused_layers)))
        for members in groups.values():
            slots = [2 * m.index + kind for m in members for kind in (0, 1)]  # slot 2i: fused layer i's K; 2i + 1: V
            deltas = self.projectors(
                None if slots == every else torch.tensor(slots),
                torch.stack([_token_rows(x.to(dtype)) for m in members for x in m.own]),
                torch.stack([_token_rows(x.to(dtype)) for m in members for x in m.sent]),
                self.temperature,
            )
            for j, m in enumerate(members):
                delta_k, delta_v = (_head_rows(d, batch) * m.inside for d in deltas[2 * j : 2 * j + 2])
                out[m.layer] = (delta_k.to(m.own[0].dtype), delta_v.to(m.own[1].dtype))
        return out

    def fuse(
        self,
        receiver_cache: DynamicCache,
        transmitter_kv: TransmitterKV,
        token_map: Tensor,
        transmitter_len: int | None = None,
    ) -> DynamicCache:
        """A new cache: the receiver's context cache plus this transmitter's residuals (the input is not changed).

        Differentiable with respect to the fuser's parameters, so training runs the receiver on the result.
        """
        return add_residuals(
            receiver_cache, [self.residuals(receiver_cache, transmitter_kv, token_map, transmitter_len)]
        )

    def save(self, folder: str | Path) -> Path:
        """Write weights and config to a staging folder that then replaces `folder` (`atomic.staged_dir`): a reader
        never sees half a fuser, and a failed or killed save leaves the previous one intact."""
        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic.staged_dir(folder) as staging:
            save_file(state, staging / WEIGHTS_FILE)
            (staging / CONFIG_FILE).write_text(self.config.to_json() + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, receiver: LoadedModel | str, transmitter: LoadedModel | str) -> CacheFuser:
        """Load a saved fuser, refusing it unless it was trained for this receiver and transmitter.

        Each of `receiver`/`transmitter` is the model itself or its `wire.model_fingerprint` (a KV blob carries it).
        """
        folder = Path(folder)
        if not is_trained(folder):
            raise FuserError(f"no trained fuser in {folder}: train one for this model pair with `fedlm kv train`")
        config = FuserConfig.from_json((folder / CONFIG_FILE).read_text())
        for role, given, expected, name in (
            ("receiver", receiver, config.receiver_fingerprint, config.receiver),
            ("transmitter", transmitter, config.transmitter_fingerprint, config.transmitter),
        ):
            actual = given if isinstance(given, str) else model_fingerprint(given)
            if actual != expected:
                raise FuserMismatchError(
                    f"fuser in {folder} was trained with {role} {name!r} (fingerprint {expected}), "
                    f"but this {role} has fingerprint {actual}: train a fuser for this model pair"
                )
        fuser = cls(config)
        try:
            fuser.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except RuntimeError as err:  # missing, unexpected or misshapen tensors
            raise FuserError(
                f"the weights in {folder} do not fit this fedlm's fuser (saved by a version with another layout, "
                f"or damaged): train it again with `fedlm kv train`. {str(err).splitlines()[0]}"
            ) from err
        return fuser.eval()


def add_residuals(receiver_cache: DynamicCache, residuals: Iterable[Residuals]) -> DynamicCache:
    """A copy of the receiver's cache with every transmitter's residuals summed in.

    Layers are shallow-copied, so a forward pass that appends to the result never touches the receiver's cache,
    which can be fused again (the next training step, another subset of transmitters).
    """
    fused = copy.copy(receiver_cache)
    fused.layers = [copy.copy(layer) for layer in receiver_cache.layers]
    for per_transmitter in residuals:
        for r, (delta_k, delta_v) in per_transmitter.items():
            fused.layers[r].keys = fused.layers[r].keys + delta_k
            fused.layers[r].values = fused.layers[r].values + delta_v
    return fused


def trained_fuser_dir(receiver: str, transmitter: str, task: str | None = "plays") -> Path:
    """Where the fuser of a model pair lives, outside git: `<cache>/fusers/<receiver>--<transmitter>--<task>`.

    `fedlm kv train --data TASK` writes there, and eval, demo and bench look there. `task=None` drops the suffix,
    for a fuser whose transmitter's name already says what it knows (the knowledge benchmark's adapted model).
    """
    folder = cache_root() / "fusers" / f"{Path(receiver).name}--{Path(transmitter).name}"
    return folder if task is None else folder.with_name(f"{folder.name}--{task}")


class _LayerInputs(NamedTuple):
    """What one fused receiver layer brings to the projectors."""

    index: int  # among the fused layers: its K and V are slots 2·index and 2·index + 1
    layer: int  # in the receiver
    inside: Tensor  # [1, 1, rows, 1]: 0 where the paired transmitter token fell out of a sliding window
    own: KV  # the receiver's K and V, [batch, heads, rows, dim]
    sent: KV  # the transmitter's, one row per receiver row


def _token_rows(x: Tensor) -> Tensor:
    """[batch, heads, rows, dim] -> [batch·rows, heads·dim]: one row of features per token."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], -1)


def _head_rows(x: Tensor, batch: int) -> Tensor:
    """[batch·rows, heads, dim] -> [batch, heads, rows, dim], as a cache layer holds them."""
    return x.view(batch, -1, *x.shape[1:]).transpose(1, 2)


def _by_layer(transmitter_kv: TransmitterKV) -> Mapping[int, KV | None]:
    return transmitter_kv if isinstance(transmitter_kv, Mapping) else dict(enumerate(transmitter_kv))
