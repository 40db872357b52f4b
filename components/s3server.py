"""A real S3 server process on loopback (moto's server), for local runs and tests.

KFP clusters have SeaweedFS or MinIO; on a laptop or in CI nothing is running, so `sam-pipeline run`
and the tests start this instead. It speaks the S3 protocol over HTTP, so the code under test is the
same minio client code that talks to the cluster's store.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from components.storage import S3Config

# moto accepts any key while auth is off; these are only placeholders the minio client needs.
ANON_KEYS = ("sam-local", "sam-local-secret")
WATCHDOG_SECONDS = 1.0

# The server process's own code (moto's server, its watchdog, the folder it keeps objects in) is a script of
# its own, components/s3_process.py, run by path: the child imports nothing of this package (and `-P` keeps the
# script's folder, components/, off its sys.path, where its modules would shadow what moto imports).
_PROCESS = str(Path(__file__).with_name("s3_process.py"))


def _die_with_parent():
    """A preexec_fn asking Linux to SIGTERM the child when the thread that started it dies (prctl(2),
    PR_SET_PDEATHSIG = 1), or None elsewhere (the watchdog alone does it). The library is looked up here, in
    the parent: between fork and exec the child should do no more than the one call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM, 0, 0, 0)


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"embedded S3 server exited with code {proc.returncode} before it was ready")
        try:
            # moto answers its own health endpoint without spending an unauthenticated action.
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"embedded S3 server at {url} did not come up within {timeout:.0f} s")


def _create_user(url: str) -> tuple[str, str]:
    """Spend the three unauthenticated calls moto allows on a user whose keys may do s3:*."""
    import boto3

    iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="sam-pipeline")
    key = iam.create_access_key(UserName="sam-pipeline")["AccessKey"]
    iam.put_user_policy(UserName="sam-pipeline", PolicyName="s3-all", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": '
        '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
    return key["AccessKeyId"], key["SecretAccessKey"]


def _server_env(auth: bool) -> dict:
    env = dict(os.environ)
    # A run's stores must not leak into each other through AWS settings of the host.
    for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(var, None)
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    return env


def start_server(owner: str, *, auth: bool = False, objects: Path | None = None,
                 log=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """Start a server owned by `owner` ("pid:<pid>" or "lease:<file>", see components/s3_process.py); (process,
    url) once it answers. `objects`: the folder the server keeps its objects in (loaded before it answers,
    written through on every change); None: in memory only. Own session: a Ctrl-C in the terminal reaches the
    run, which then stops the server in order. A lease-owned server must outlive the run that started it, so it
    does not get the parent-death signal."""
    keep = ["--objects", str(objects)] if objects is not None else []
    # The port is bound here and the listening socket handed to the server: a port looked up free and bound
    # later by the child could be taken in between by another run's server starting at the same moment, and
    # that server's answer taken for this one's.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        port = listening.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-P", _PROCESS, owner, str(WATCHDOG_SECONDS), *keep, "--fd", str(listening.fileno()),
             "-p", str(port)], pass_fds=(listening.fileno(),),
            env=_server_env(auth), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent() if owner.startswith("pid:") else None)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def is_up(endpoint: str) -> bool:
    """Whether a server of ours answers at host:port."""
    try:
        urllib.request.urlopen(f"http://{endpoint}/moto-api/", timeout=2).close()
        return True
    except OSError:
        return False


def local_config(endpoint: str, *, bucket: str = "mlpipeline", prefix: str = "sam-pipeline/",
                 keys: tuple[str, str] = ANON_KEYS) -> S3Config:
    return S3Config(endpoint=endpoint, bucket=bucket, prefix=prefix, access_key=keys[0], secret_key=keys[1],
                    secure=False, region="us-east-1")


@contextlib.contextmanager
def embedded_s3(auth: bool = False, *, bucket: str = "mlpipeline", prefix: str = "sam-pipeline/",
                log_path: str | None = None) -> Iterator[S3Config]:
    """Start moto's S3 server on 127.0.0.1:<free port> for this process; yield a config that reaches it."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc, url = start_server(f"pid:{os.getpid()}", auth=auth, log=log)
        try:
            keys = _create_user(url) if auth else ANON_KEYS
            yield local_config(url.removeprefix("http://"), bucket=bucket, prefix=prefix, keys=keys)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def main() -> None:
    """`python -m components.s3server`: run a server in the foreground and print how to reach it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--auth", action="store_true", help="enforce credentials")
    args = parser.parse_args()
    with embedded_s3(auth=args.auth) as cfg:
        print(f"S3_ENDPOINT={cfg.endpoint} AWS_ACCESS_KEY_ID={cfg.access_key} "
              f"AWS_SECRET_ACCESS_KEY={cfg.secret_key}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
