"""What the command line tells the server beyond the engine: its name for the model, the API key, who may
call it from where, how long a shutdown drains, and the budgets of every call."""

from __future__ import annotations

from dataclasses import dataclass, field

from glassbox.research.limits import Limits

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerSettings:
    model_name: str = "SmolLM2-135M-Instruct"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    ready_message: str | None = None  # printed once the engine runs (the CLI's one line)
    # Host headers accepted (DNS-rebinding guard); None: any. `for_bind` derives it from the bound address.
    allowed_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call (CORS); none by default
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long, then are failed
    exit_on_engine_death: bool = False  # the CLI's server stops its process if the engine cannot go on

    @property
    def max_body_bytes(self) -> int:
        return self.limits.max_body_bytes


def allowed_hosts_for(bind_host: str, given: list[str] | None) -> tuple[str, ...] | None:
    """--allowed-hosts as given ("*": any); else the bound address, and its loopback names when it is a
    loopback address. Bound to every interface (0.0.0.0, ::) without --allowed-hosts: any Host (the
    server cannot know its names; say them with --allowed-hosts to close DNS rebinding)."""
    if given:
        return None if "*" in given else tuple(given)
    if bind_host in ("0.0.0.0", "::", ""):
        return None
    if bind_host in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS
    return (bind_host,)
