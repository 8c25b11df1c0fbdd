"""levante as a Ray Serve application.

    serve run levante.serve.ray_serve:app                        the default model, one Serve replica
    serve run levante.serve.ray_serve:build_app flags="-m MODEL --max-num-seqs 32" num_replicas=2
    serve deploy deploy/serve_config.yaml                        a Serve config file naming `build_app`
    kubectl apply -f deploy/rayservice.yaml                      KubeRay's RayService, the same config inside

`flags` are `levante serve`'s own (the CLI parses them, so a wrong one fails as it does there). Each
Serve replica is one levante server: the same app behind the same guards (Host/Origin site gate, API
key, body limits) and the same pipeline, its models loaded in the replica's constructor; Ray Serve
spreads requests over the replicas, health-checks them through /health, and replaces one that dies.
Inside one replica, `--data-parallel-size N --distributed-executor-backend ray` adds N engine actors
on the same cluster, routed by prefix (engine/data_parallel.py).
"""
from __future__ import annotations

import shlex

from ray import serve

from levante.errors import LevanteError


def _server(flags: list[str]):
    """The loaded server state and its guarded ASGI app, for `levante serve FLAGS`."""
    from levante.cli import build_parser
    from levante.serve.server import guarded_app, load_models, server_state, site_policy

    args = build_parser().parse_args(["serve", *flags])
    state, specs, policy, _ = server_state(args)
    load_models(state, specs, args, policy)
    state.ready = True
    return state, guarded_app(state, args.host, args.api_key, args.open_metrics, site_policy(args))


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class LevanteServer:
    def __init__(self, flags: list[str]):
        try:
            self.state, self.levante_app = _server(flags)
        except LevanteError as e:  # one line in Serve's status, not a traceback
            raise RuntimeError(f"levante: {e}") from None

    def __serve_build_asgi_app__(self):
        return self.levante_app

    def check_health(self) -> None:
        status, body = self.state.health()
        if status != 200:
            raise RuntimeError(f"levante: unhealthy: {body}")

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.close()


def build_app(args: dict):
    """The application for `args`: {"flags": "levante serve flags", "num_replicas": N} (both optional)."""
    flags = args.get("flags", "")
    flags = shlex.split(flags) if isinstance(flags, str) else [str(flag) for flag in flags]
    return LevanteServer.options(num_replicas=int(args.get("num_replicas", 1))).bind(flags)


app = build_app({})
