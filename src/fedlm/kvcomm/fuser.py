"""C2C-style cache fuser: project a transmitter's KV cache into the receiver's and add it as a gated residual.

Split like PEFT: `FuserConfig` (the model pair and the shapes, JSON), `LayerFuser` (one receiver layer), and
`CacheFuser` (all layers, fuse, save/load). The fused cache is receiver + gate · head_weight · projection, with
the projection's last layer zero-initialised, so an untrained fuser is exactly the receiver alone and training
starts from there.

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


class Projector(nn.Module):
    """Maps one of K or V: (receiver heads, aligned transmitter heads) per token -> a gated residual on the receiver.

    Each side is layer-normed before the concatenation: the two models' keys differ in scale by orders of magnitude
    (Gemma normalises its keys, llama does not), and the MLP should see both on an equal footing.
    """

    def __init__(self, heads: int, head_dim: int, transmitter_dim: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim + transmitter_dim
        self.receiver_norm = nn.LayerNorm(heads * head_dim)
        self.transmitter_norm = nn.LayerNorm(transmitter_dim)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, heads * head_dim),
        )
        nn.init.zeros_(self.mlp[-1].weight)  # the residual starts at exactly zero: receiver-alone behaviour
        nn.init.zeros_(self.mlp[-1].bias)
        self.head_weights = nn.Linear(width, heads)
        # Starts open (sigmoid(1) ≈ 0.73) so the projection gets gradient; training may close it for good.
        self.gate_logit = nn.Parameter(torch.tensor(1.0))

    def gate(self, temperature: float) -> Tensor:
        """Gumbel-sigmoid while training; hard 0/1 by the logit's sign at inference."""
        if self.training:
            return gumbel_sigmoid(self.gate_logit, temperature)
        return (self.gate_logit > 0).to(self.gate_logit.dtype)

    def forward(self, receiver: Tensor, transmitter: Tensor, temperature: float) -> Tensor:
        """receiver [B, H, S, D] and transmitter [B, Ht, S, Dt] (already token-aligned) -> residual [B, H, S, D]."""
        batch, _, rows, _ = receiver.shape
        x = torch.cat(
            [
                self.receiver_norm(receiver.transpose(1, 2).reshape(batch, rows, -1)),
                self.transmitter_norm(transmitter.transpose(1, 2).reshape(batch, rows, -1)),
            ],
            dim=-1,
        )
        projection = self.mlp(x).view(batch, rows, self.heads, self.head_dim)
        weights = torch.sigmoid(self.head_weights(x)).unsqueeze(-1)  # [B, S, H, 1]: how much each head takes
        return (self.gate(temperature) * weights * projection).transpose(1, 2)


class LayerFuser(nn.Module):
    """One receiver layer. K and V get separate projectors: keys carry rotary position and feed the dot product,
    values carry content; one shared map would have to serve two unrelated geometries for little saving."""

    def __init__(self, heads: int, head_dim: int, transmitter_dim: int, hidden: int) -> None:
        super().__init__()
        self.key = Projector(heads, head_dim, transmitter_dim, hidden)
        self.value = Projector(heads, head_dim, transmitter_dim, hidden)

    def forward(self, receiver: KV, transmitter: KV, temperature: float) -> KV:
        return (
            self.key(receiver[0], transmitter[0], temperature),
            self.value(receiver[1], transmitter[1], temperature),
        )


class CacheFuser(nn.Module):
    """All layer fusers of one receiver/transmitter pair (receiver layers with no partner have none)."""

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        self.config = config
        self.temperature = 1.0  # of the training gates; the training loop anneals it
        transmitter_dim = config.transmitter_kv_heads * config.transmitter_head_dim
        self.layers = nn.ModuleDict(
            {
                str(r): LayerFuser(config.receiver_kv_heads, config.receiver_head_dim, transmitter_dim, config.hidden)
                for r, t in enumerate(config.layer_map)
                if t is not None
            }
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
        out: Residuals = {}
        for name, fuser in self.layers.items():
            r, t = int(name), self.config.layer_map[int(name)]
            if t not in available:
                continue
            layer = receiver_cache.layers[r]
            rows = layer.keys.shape[-2]
            pairs = token_map[len(token_map) - rows :].to(layer.keys.device)
            t_keys, t_values = (x if x.dim() == 4 else x[None] for x in available[t])  # a wire payload has no batch
            index = pairs - (transmitter_len - t_keys.shape[-2])  # row of each paired token in this layer
            inside = (index >= 0).to(dtype).view(1, 1, rows, 1)
            index = index.clamp(min=0)
            delta_k, delta_v = fuser(
                (layer.keys.to(dtype), layer.values.to(dtype)),
                (t_keys.to(dtype)[:, :, index], t_values.to(dtype)[:, :, index]),
                self.temperature,
            )
            out[r] = ((delta_k * inside).to(layer.keys.dtype), (delta_v * inside).to(layer.values.dtype))
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
        fuser.load_state_dict(load_file(folder / WEIGHTS_FILE))
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


def _by_layer(transmitter_kv: TransmitterKV) -> Mapping[int, KV | None]:
    return transmitter_kv if isinstance(transmitter_kv, Mapping) else dict(enumerate(transmitter_kv))
