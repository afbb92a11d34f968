"""The target spec's schema: every key of a target ``.toml`` and its tables.

One line per key: its type (``edgebuild.core.schema``'s strict types and ranges), its default
and its description; ``edgebuild targets docs`` renders them as ``docs/targets.md``. Loading and
the registry of named targets are in ``edgebuild.targets.spec``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, Strict, field_validator, model_validator

from edgebuild.core.schema import (
    NOT_LISTED, Bool, KeyProblem, NonNegativeInt, Port, PositiveFloat, PositiveInt, Str,
    names_from, schema, unknown_name,
)
from edgebuild.export.encodings import ACCURACY_LEVELS, BLOCK_SIZES, encodings
from edgebuild.targets.transport import transports

ARCHES = ("native", "aarch64", "armv7l", "x86_64", "riscv64")   # native: whatever the host is
ON_UNREACHABLE = ("fail", "warn")
NAME_RULE = "lowercase letters, digits, '.', '_' or '-'"
Name = Annotated[str, Strict(), Field(pattern=r"^[a-z0-9][a-z0-9._-]*$",
                                      json_schema_extra={"allowed": NAME_RULE})]
Version = Annotated[str, Strict(), Field(pattern=r"^\d+\.\d+$",
                                         json_schema_extra={"allowed": "MAJOR.MINOR such as '3.11'"})]
PROVIDERS = {"allowed": "a list of onnxruntime execution providers such as 'CPUExecutionProvider'"}


@schema
class RuntimeSpec:
    """``[runtime]``: how the agent runs the model."""

    threads: PositiveInt | None = Field(None, description="intra-op threads (not set: onnxruntime's default)")
    providers: list[Str] = Field(default_factory=lambda: ["CPUExecutionProvider"], description="onnxruntime execution providers, in order of preference", json_schema_extra=PROVIDERS)
    python_version: Version | None = Field(None, description="the device's Python (\"3.11\"), for its wheels")
    glibc: Version | None = Field(None, description="the device's glibc (\"2.36\"): the newest manylinux tag its wheels may carry")
    encoding: Str = Field("int4", description="runtime encoding of the linear layers: what the device executes", json_schema_extra=names_from("encoding", encodings.names))
    embedding_encoding: Str | None = Field(None, description="runtime encoding of the embedding and tied output head (not set: as encoding)", json_schema_extra=names_from("encoding", encodings.names))
    block_size: Literal[BLOCK_SIZES] = Field(32, description="values per scale of the blockwise encodings")
    accuracy_level: Literal[ACCURACY_LEVELS] = Field(4, description="MatMulNBits compute: 4 int8 activations (needs int8 dot products), 1 fp32")
    symmetric: Bool = Field(True, description="blockwise encodings without zero points")
    fallback_encoding: Str | None = Field(None, description="encoding used where the device's onnxruntime lacks an operator (not set: such a stage fails)", json_schema_extra=names_from("encoding", encodings.names))
    storage_budget_mb: PositiveFloat | None = Field(None, description="the agent prunes old stage versions to stay within this (MB, 10^6 bytes)")

    @field_validator("encoding", "embedding_encoding", "fallback_encoding")
    @classmethod
    def _encoding(cls, name: str | None) -> str | None:
        if name is not None and name not in encodings:
            raise unknown_name((), "encoding", name, encodings.names())
        return name

    @field_validator("providers")
    @classmethod
    def _providers(cls, providers: list[str]) -> list[str]:
        if not providers or not all(p.endswith("ExecutionProvider") for p in providers):
            raise KeyProblem((), "list onnxruntime execution providers such as 'CPUExecutionProvider'",
                             providers)
        return providers


@schema
class Timing:
    """``[timing]``: how the agent times a stage (warm-up rounds, then timed repeats)."""

    prompt_len: PositiveInt = Field(64, description="prompt tokens of each prefill")
    decode_tokens: PositiveInt = Field(32, description="tokens decoded with the KV cache after it")
    warmup: NonNegativeInt = Field(2, description="untimed rounds before the timed ones")
    repeats: PositiveInt = Field(5, description="timed rounds")


@schema
class Budgets:
    """``[budgets]``: what a stage must achieve on the device to pass its gates."""

    decode_ms_per_token_p95: PositiveFloat = Field(description="95th percentile of decode latency per token, ms")
    prefill_ms: PositiveFloat = Field(description="median prefill of timing.prompt_len tokens, ms")
    peak_rss_mb: PositiveFloat = Field(description="peak resident memory of the agent, MiB")
    artifact_mb: PositiveFloat = Field(description="packed weights, in MB (10^6 bytes)")


@schema
class Connection:
    """``[connection]``: how to reach the device's agent."""

    transport: Str = Field("local", description="how the agent is reached", json_schema_extra=names_from("transport", transports.names))
    host: Str | None = Field(None, description="the device's host name or address (required for ssh)")
    user: Str | None = Field(None, description="login user (not set: the local user name)")
    port: Port = Field(22, description="SSH port")
    key: Str | None = Field(None, description="private key file (not set: ssh-agent, ~/.ssh keys); relative to the spec file")
    known_hosts: Str = Field("~/.ssh/known_hosts", description="known_hosts file the host key is checked against")
    trust_on_first_use: Bool = Field(False, description="accept and record an unknown host key")
    agent_python: Str | None = Field(None, description="the device's interpreter for the agent (not set: this one for local, python3 for ssh)")
    root: Str = Field("~/.cache/edgebuild/agent", description="the agent's folder on the device")
    connect_timeout_s: PositiveFloat = Field(10.0, description="seconds to wait for a connection")
    retries: NonNegativeInt = Field(3, description="reconnect attempts after a failed connection or a fault mid-build (the agent died, the link dropped or stopped answering), each after an exponential backoff; then the device counts as lost")
    backoff_s: PositiveFloat = Field(1.0, description="seconds before the first reconnect attempt; doubled for each next one")
    backoff_max_s: PositiveFloat = Field(30.0, description="longest wait between two reconnect attempts, seconds")
    timeout_s: PositiveFloat = Field(300.0, description="longest wait for one agent reply (load, time, a score batch), seconds; no reply by then counts as a lost connection")
    env_prefix: Str | None = Field(None, description="read <prefix>PORT, <prefix>USER, ... from the environment")

    @field_validator("transport")
    @classmethod
    def _transport(cls, name: str) -> str:
        if name not in transports:
            raise unknown_name((), "transport", name, transports.names())
        return name

    @model_validator(mode="after")
    def _host(self):
        if self.transport == "ssh" and not self.host:
            raise KeyProblem(("host",), "be set when connection.transport is 'ssh'", self.host)
        return self


@schema
class LabgridSpec:
    """``[labgrid]``: the board is a labgrid place (or any of the places carrying ``tags``)."""

    place: Str | None = Field(None, description="one place, by name")
    tags: dict[Str, Str] | None = Field(None, description="a group: every place carrying all these tags")
    coordinator: Str | None = Field(None, description="HOST:PORT of the labgrid coordinator (not set: $LG_COORDINATOR, else labgrid's default)")
    resource: Str = Field("NetworkService", description="the place's resource that names the SSH address")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.place is None) == (self.tags is None):
            raise KeyProblem(("place",), "be set, or 'tags' instead (exactly one of them)", self.place)
        if self.tags is not None and not self.tags:
            raise KeyProblem(("tags",), "name at least one tag", self.tags)
        return self


@schema
class Target:
    """One device class, as read from a spec file."""

    name: Name = Field(description=f"the target's name ({NAME_RULE}); a registered spec's equals its file name")
    description: Str = Field(description="one line shown by `edgebuild targets list`")
    arch: Literal["native", "aarch64", "armv7l", "x86_64", "riscv64"] = Field(description="the device's CPU architecture (native: the host's)")
    cores: PositiveInt = Field(description="CPU cores")
    ram_mb: PositiveInt = Field(description="RAM, MiB")
    storage_mb: PositiveInt = Field(description="free storage for stages, MiB")
    memory_bandwidth_gbps: PositiveFloat = Field(description="sustained memory bandwidth, GB/s, for the predicted decode latency")
    budgets: Budgets = Field(description="the `[budgets]` table")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="the `[runtime]` table")
    timing: Timing = Field(default_factory=Timing, description="the `[timing]` table")
    connection: Connection = Field(default_factory=Connection, description="the `[connection]` table")
    on_unreachable: Literal["fail", "warn"] = Field("fail", description="an unreachable device fails the build, or (warn) its gates are reported as not run, never invented")
    emulated: Bool = Field(False, description="an emulated CPU (`edgebuild device emulate`): its latencies are not the board's and gate nothing")
    labgrid: LabgridSpec | None = Field(None, description="the `[labgrid]` table: reach the board through a labgrid place (with connection.transport = \"labgrid\")")
    source: Annotated[Path | None, Field(description="the spec file (not a key)", json_schema_extra=NOT_LISTED)] = dataclasses.field(default=None, compare=False)

    @model_validator(mode="after")
    def _labgrid_transport(self):
        if (self.labgrid is None) != (self.connection.transport != "labgrid"):
            raise KeyProblem(("labgrid",), "go together with connection.transport = 'labgrid' (a [labgrid] "
                             "table and that transport, or neither)", self.connection.transport)
        return self

    def validate(self) -> "Target":
        """Check every key's type, allowed values and range again; raise ``TargetError`` naming
        the file, the key and what is allowed. Returns ``self``."""
        from edgebuild.core.errors import TargetError
        from edgebuild.core.schema import load
        load(Target, dataclasses.asdict(self), str(self.source or "target spec"), TargetError)
        return self

    def to_dict(self) -> dict:
        """The spec as plain JSON-serialisable data (``source`` as a string)."""
        data = dataclasses.asdict(self)
        data["source"] = str(self.source) if self.source else None
        return data

    def budgets_dict(self) -> dict:
        """``{budget name: limit}``: every ``[budgets]`` key (``spec.gate_applies`` says which the
        device can judge on this target)."""
        return dataclasses.asdict(self.budgets)

    def digest(self) -> str:
        """sha256 of everything that can change a device measurement (all but description/source)."""
        data = self.to_dict()
        data.pop("source")
        data.pop("description")
        data.pop("labgrid")                    # which lab place served it: not the board class
        if not data["emulated"]:
            data.pop("emulated")               # specs from before the key keep their digests
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def path_of(self, value: str) -> Path:
        """A host-side path from the spec (a key or known_hosts file): ``~`` expanded, relative
        paths taken from the spec file's folder."""
        path = Path(value).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path
