"""Transmitters served on loopback HTTP for a receiver: each model behind its own KV service, with a client and the
trained fuser that maps its cache into the receiver's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlm.egress import EgressHook
from fedlm.kvcomm.client import TransmitterClient
from fedlm.kvcomm.fuser import CacheFuser
from fedlm.kvcomm.receiver import Transmitter
from fedlm.kvcomm.shipped import find_fuser
from fedlm.kvcomm.wire import WireFormat
from fedlm.models import LoadedModel


@dataclass(frozen=True)
class TransmitterSpec:
    """A transmitter to serve: its model (served on loopback here) and its trained fuser's folder."""

    model: LoadedModel
    fuser_dir: Path | None = None  # default: `find_fuser(receiver, model)`

    def fuser_folder(self, receiver: str) -> Path:
        """Where this transmitter's fuser into `receiver` is: the folder given, else the pair's trained or shipped
        one."""
        return self.fuser_dir or find_fuser(receiver, self.model.name)


@contextmanager
def serve_transmitters(
    receiver: LoadedModel,
    specs: Sequence[TransmitterSpec],
    fmt: WireFormat = "fp16",
    egress: EgressHook | None = None,
) -> Iterator[tuple[list[Transmitter], list[TransmitterClient]]]:
    """Each transmitter served over loopback HTTP, with a client and its fuser; everything closes with the block.
    Every client sends through `egress` (the caller's privacy gate; default: audited, unchanged).

    Only the transmitter layers a fuser uses are requested, so a fuser trained on a layer subset costs only that.
    """
    from fedlm.kvcomm.service import background_transmitter

    with ExitStack() as stack:
        transmitters, clients = [], []
        for spec in specs:
            fuser = CacheFuser.load(spec.fuser_folder(receiver.name), receiver, spec.model)
            url = stack.enter_context(background_transmitter(spec.model))
            client = stack.enter_context(
                TransmitterClient(url, egress=egress, expect_fingerprint=fuser.config.transmitter_fingerprint)
            )
            layers = sorted({t for t in fuser.config.layer_map if t is not None})

            def send(text: str, client: TransmitterClient = client, layers: list[int] = layers) -> Any:
                return client.encode(text, fmt, layers)[0]

            transmitters.append(Transmitter(spec.model.name, fuser, send))
            clients.append(client)
        yield transmitters, clients
