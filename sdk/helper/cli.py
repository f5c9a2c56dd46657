"""tessera-helper: keeps SVID, key and bundle files (and JWT-SVIDs) current for software that reads
certificates from files (nginx, Apache, databases), and tells it to reload.

Daemon mode (default) watches the Workload API: every update rewrites the files atomically, then the
configured process is told: ``cmd`` is started after the first write and sent ``renew_signal`` after each
later one (restarted at the next update if it has exited); the pid in ``pid_file_name`` gets
``renew_signal``. JWT-SVIDs are refreshed at half their lifetime. With ``daemon_mode = false`` the files are
written once, the pid is signalled, ``cmd`` (if any) is run to completion and its exit status returned.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from tessera.sdk.bundle import BundleSet, JwtBundle
from tessera.sdk.config import ConfigError
from tessera.sdk.crl import crls_to_pem
from tessera.sdk.errors import TesseraError, WorkloadApiError
from tessera.sdk.files import write_atomic
from tessera.sdk.helper.config import HelperConfig, load_config
from tessera.sdk.helper.files import bundle_pem, ensure_dir, jwt_bundles_json
from tessera.sdk.logs import setup_logging
from tessera.sdk.workloadapi.client import WorkloadApiClient
from tessera.sdk.workloadapi.common import BackoffPolicy, X509Context, is_final

log = logging.getLogger("tessera.helper")

#: Shortest wait between JWT-SVID refreshes, so a token with a very short life cannot spin the helper.
MIN_JWT_REFRESH = 1.0


class Helper:
    def __init__(self, config: HelperConfig, backoff: BackoffPolicy | None = None) -> None:
        self.config = config
        self._backoff = backoff or BackoffPolicy(initial=0.5, maximum=10.0)
        self._client = WorkloadApiClient(config.agent_address, backoff=self._backoff)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._jwt_due = 0.0  # monotonic time of the next JWT-SVID refresh
        self._last_error: WorkloadApiError | None = None
        self._write_error: Exception | None = None
        self.writes = 0

    def _path(self, name: str) -> str:
        return os.path.join(self.config.cert_dir, name)

    # -- writing ---------------------------------------------------------------------------------------

    def write_x509(self, context: X509Context) -> None:
        cfg = self.config
        svid = context.default_svid
        ensure_dir(cfg.cert_dir)
        # Key first, then the chain: a reader that sees the new chain always finds its key already there.
        write_atomic(self._path(cfg.svid_key_file_name), svid.key_pem(), cfg.key_file_mode)
        write_atomic(self._path(cfg.svid_file_name), svid.chain_pem(), cfg.cert_file_mode)
        write_atomic(
            self._path(cfg.svid_bundle_file_name),
            bundle_pem(context, svid, cfg.include_federated_domains),
            cfg.cert_file_mode,
        )
        if cfg.crl_file_name is not None:
            # Written before the reload like the rest: nginx's ssl_crl then refuses revoked client SVIDs.
            # (OpenSSL checking CRLs wants one for every CA of the chain; the server signs one per CA.)
            write_atomic(self._path(cfg.crl_file_name), crls_to_pem(context.crls), cfg.cert_file_mode)
        log.info("wrote X509-SVID %s (expires %s)", svid.spiffe_id, svid.expires_at.isoformat())

    def write_jwt_svids(self) -> None:
        """Fetches and writes every configured JWT-SVID; schedules the next refresh at half the shortest life."""
        cfg = self.config
        if not cfg.jwt_svids:
            return
        ensure_dir(cfg.cert_dir)
        now = dt.datetime.now(dt.UTC)
        next_in = float("inf")
        for item in cfg.jwt_svids:
            token = self._client.fetch_jwt_svid((item.audience, *item.extra_audiences))
            write_atomic(self._path(item.file_name), token.token.encode(), cfg.jwt_svid_file_mode)
            issued = token.issued_at or now
            half = (token.expires_at - issued).total_seconds() / 2
            next_in = min(next_in, max(MIN_JWT_REFRESH, (issued - now).total_seconds() + half))
            log.info("wrote JWT-SVID for audience %s (expires %s)", item.audience, token.expires_at.isoformat())
        self._jwt_due = time.monotonic() + next_in

    def write_jwt_bundles(self, bundles: BundleSet[JwtBundle]) -> None:
        cfg = self.config
        if cfg.jwt_bundle_file_name is None:
            return
        ensure_dir(cfg.cert_dir)
        write_atomic(self._path(cfg.jwt_bundle_file_name), jwt_bundles_json(bundles), cfg.jwt_bundle_file_mode)
        log.info("wrote JWT bundles for %s", ", ".join(sorted(td.name for td in bundles)))

    # -- telling the process ---------------------------------------------------------------------------

    def _signal_pid_file(self) -> None:
        cfg = self.config
        if not cfg.pid_file_name or cfg.renew_signal is None:
            return
        try:
            with open(cfg.pid_file_name) as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError) as exc:
            log.error("cannot read a pid from %s: %s", cfg.pid_file_name, exc)
            return
        try:
            os.kill(pid, cfg.renew_signal)
            log.info("sent %s to pid %d", cfg.renew_signal.name, pid)
        except OSError as exc:
            log.error("cannot signal pid %d from %s: %s", pid, cfg.pid_file_name, exc)

    def _start_cmd(self) -> subprocess.Popen[bytes]:
        cfg = self.config
        assert cfg.cmd is not None
        process = subprocess.Popen([cfg.cmd, *cfg.cmd_args])
        log.info("started %s (pid %d)", cfg.cmd, process.pid)
        return process

    def notify(self) -> None:
        """Called after files changed (in daemon mode)."""
        cfg = self.config
        if cfg.cmd:
            process = self._process
            if process is None or process.poll() is not None:
                if process is not None:
                    # A reload command (`nginx -s reload`) finishes every time: only a failure is news.
                    level = logging.INFO if process.returncode == 0 else logging.WARNING
                    log.log(level, "%s exited with status %s; running it again", cfg.cmd, process.returncode)
                try:
                    self._process = self._start_cmd()
                except OSError as exc:
                    log.error("cannot start %s: %s", cfg.cmd, exc)
            elif cfg.renew_signal is not None:
                process.send_signal(cfg.renew_signal)
                log.info("sent %s to %s (pid %d)", cfg.renew_signal.name, cfg.cmd, process.pid)
        self._signal_pid_file()

    # -- modes -----------------------------------------------------------------------------------------

    def _on_x509(self, context: X509Context) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            try:
                self.write_x509(context)
            except (OSError, TesseraError) as exc:
                self._write_error = exc
                log.error("could not write the files: %s", exc)
                return
            if not self._first.is_set():
                try:
                    self.write_jwt_svids()
                except (OSError, TesseraError) as exc:
                    # The X.509 files are in place; the main loop retries the JWT-SVIDs shortly.
                    log.error("could not write JWT-SVIDs (retrying in %ss): %s", MIN_JWT_REFRESH, exc)
                    self._jwt_due = time.monotonic() + MIN_JWT_REFRESH
            self.writes += 1
            self._first.set()
            self.notify()

    def _on_jwt_bundles(self, bundles: BundleSet[JwtBundle]) -> None:
        with self._lock:
            try:
                self.write_jwt_bundles(bundles)
            except OSError as exc:
                log.error("could not write the JWT bundle file: %s", exc)
                return
            if self._first.is_set():
                self.notify()

    def _on_error(self, error: WorkloadApiError) -> None:
        self._last_error = error
        log.warning("Workload API: %s", error)

    def run_daemon(self) -> int:
        cfg = self.config
        watch = self._client.watch_x509_context(self._on_x509, self._on_error)
        bundle_watch = (
            self._client.watch_jwt_bundles(self._on_jwt_bundles, self._on_error) if cfg.jwt_bundle_file_name else None
        )
        deadline = time.monotonic() + cfg.timeout
        while not self._first.is_set():
            if self._stop.is_set():
                return 0
            if watch.stopped or time.monotonic() > deadline:
                if self._write_error is not None:
                    message = f"could not write the files in {cfg.cert_dir}: {self._write_error}"
                else:
                    last = watch.error or self._last_error
                    detail = f": {last}" if last else ""
                    message = f"no X509-SVID from {cfg.agent_address} within {cfg.timeout:g}s{detail}"
                print(f"tessera-helper: {message}", file=sys.stderr)
                self.close()
                return 1
            self._first.wait(0.1)
        while not self._stop.is_set():
            if watch.stopped:
                print(f"tessera-helper: the Workload API watch stopped: {watch.error}", file=sys.stderr)
                self.close()
                return 1
            if cfg.jwt_svids and time.monotonic() >= self._jwt_due:
                self._refresh_jwts()
            self._stop.wait(0.2)
        if bundle_watch is not None:
            bundle_watch.cancel()
        self.close()
        return 0

    def _refresh_jwts(self) -> None:
        with self._lock:
            try:
                self.write_jwt_svids()
            except (OSError, TesseraError) as exc:
                log.error("could not refresh JWT-SVIDs (retrying in %ss): %s", MIN_JWT_REFRESH, exc)
                self._jwt_due = time.monotonic() + MIN_JWT_REFRESH
                return
            self.notify()

    def _fetch_with_retry(self) -> X509Context:
        deadline = time.monotonic() + self.config.timeout
        backoff = self._backoff.start()
        while True:
            try:
                return self._client.fetch_x509_context()
            except WorkloadApiError as exc:
                if is_final(exc) or time.monotonic() > deadline:
                    raise
                log.warning("Workload API: %s (retrying)", exc)
                if self._stop.wait(backoff.next_delay()):
                    raise

    def run_once(self) -> int:
        cfg = self.config
        try:
            context = self._fetch_with_retry()
            self.write_x509(context)
            self.write_jwt_svids()
            if cfg.jwt_bundle_file_name:
                self.write_jwt_bundles(self._client.fetch_jwt_bundles())
        except (OSError, TesseraError) as exc:
            print(f"tessera-helper: {exc}", file=sys.stderr)
            return 1
        finally:
            self._client.close()
        self.writes += 1
        self._signal_pid_file()
        if cfg.cmd:
            try:
                return subprocess.call([cfg.cmd, *cfg.cmd_args])
            except OSError as exc:
                print(f"tessera-helper: cannot run {cfg.cmd}: {exc}", file=sys.stderr)
                return 1
        return 0

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._client.close()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
        helper = Helper(config)
    except (ConfigError, WorkloadApiError) as exc:
        print(f"tessera-helper: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    if not config.daemon_mode:
        return helper.run_once()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        helper.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return helper.run_daemon()


if __name__ == "__main__":
    sys.exit(main())
