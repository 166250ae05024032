"""An ApiClient (official `kubernetes.aio` client) from the credentials README.md names, in order:
the in-cluster service account, else the configured kubeconfig path, else $KUBECONFIG.

In a pod, the service account's token is re-read by the client's own refresh hook, so rotated
(projected) tokens keep working.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.config import ConfigException, load_kube_config
from kubernetes.aio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

log = logging.getLogger(__name__)


class CredentialsError(Exception):
    """No usable way to reach the Kubernetes API; the message says what was tried."""


def _kubeconfig_files(value: str) -> list[str]:
    """The existing files of a kubeconfig path list (`:`-separated, as $KUBECONFIG is)."""
    return [os.path.expanduser(p) for p in value.split(os.pathsep)
            if p and os.path.isfile(os.path.expanduser(p))]


async def make_api_client(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    token_path: str = SERVICE_TOKEN_FILENAME,
    ca_path: str = SERVICE_CERT_FILENAME,
) -> ApiClient:
    """A new ApiClient from `load_configuration` (same arguments); the caller closes it
    (`await api.close()`)."""
    return ApiClient(configuration=await load_configuration(
        kubeconfig, context=context, environ=environ, token_path=token_path, ca_path=ca_path))


async def load_configuration(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    token_path: str = SERVICE_TOKEN_FILENAME,
    ca_path: str = SERVICE_CERT_FILENAME,
) -> Configuration:
    """The client Configuration from the first source that applies.

    `kubeconfig` is the `watchers.kubernetes.kubeconfig` setting (`~` is expanded); `context`
    picks a kubeconfig context (default: its current-context). `environ`, `token_path` and
    `ca_path` exist for tests. Raises CredentialsError naming every source tried."""
    env = os.environ if environ is None else environ
    tried: list[str] = []
    cfg = Configuration()

    if env.get(SERVICE_HOST_ENV_NAME):
        try:
            InClusterConfigLoader(token_filename=token_path, cert_filename=ca_path,
                                  environ=env).load_and_set(cfg)
            log.info("kubernetes: in-cluster service account, API at %s", cfg.host)
            return cfg
        except ConfigException as e:
            tried.append(f"in-cluster service account ({e})")
    else:
        tried.append(f"in-cluster service account (${SERVICE_HOST_ENV_NAME} is not set)")

    sources: list[tuple[str, str]] = []
    if kubeconfig:
        sources.append(("watchers.kubernetes.kubeconfig", os.fspath(kubeconfig)))
    else:
        tried.append("watchers.kubernetes.kubeconfig (not set)")
    if env.get("KUBECONFIG"):
        sources.append(("$KUBECONFIG", env["KUBECONFIG"]))
    else:
        tried.append("$KUBECONFIG (not set)")

    for name, value in sources:
        files = _kubeconfig_files(value)
        if not files:
            tried.append(f"{name} ({value}: no such file)")
            continue
        try:
            await load_kube_config(config_file=os.pathsep.join(files), context=context,
                                   client_configuration=cfg, persist_config=False)
        except (ConfigException, KeyError, TypeError, ValueError, OSError) as e:
            raise CredentialsError(f"kubernetes: cannot use the kubeconfig from {name} "
                                   f"({value}): {e}; fix that file or point {name} at "
                                   "another one") from e
        log.info("kubernetes: kubeconfig %s from %s, API at %s", value, name, cfg.host)
        return cfg

    raise CredentialsError("kubernetes: no credentials found; tried " + "; ".join(tried)
                           + ". Run in a pod with a service account, or set "
                           "watchers.kubernetes.kubeconfig or $KUBECONFIG")

