"""Attacks, written as an attacker would make them: a local user talking to Prefect
without the credential, a run created with the credential but an escaping path, disks
whose backing file, data file or symlink points outside the allowed roots, a file that
lies about its format, secrets on disk, and requests that are unauthenticated, oversized
or carry paths no OS accepts."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from hyper2kvm import qemu_img
from tests.helpers import domain_defined
from tests.peers import BIN, Daemon, start_daemon, stop_daemon, unique, wait_for_job

SECRET = b"root-only secret " * 64  # 1088 bytes; a disk that holds it leaked it


def secret_file(folder: Path, name: str = "secret.raw", size: int = 1024 * 1024) -> Path:
    """A root-only file outside every root the daemon may read."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(SECRET + bytes(size - len(SECRET)))
    path.chmod(0o600)
    return path


def create_qcow2(path: Path, *options: str, size: str = "1M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), size],
                   check=True)
    return path


def convert(api: httpx.Client, source: Path, output: str) -> httpx.Response:
    return api.post("/convert", json={"source_path": str(source), "output_path": output})


def convert_outcome(api: httpx.Client, daemon: Daemon, source: Path) -> str:
    """The refusal's message, from the API (422) or from the job's failure; nothing may
    have been written where the output would go."""
    output = unique("out")
    answer = convert(api, source, output)
    if answer.status_code == 422:
        message = answer.json()["message"]
    else:
        assert answer.status_code == 200, answer.text
        info = wait_for_job(api, answer.json()["job_id"])
        assert info["status"] == "failed", f"{source.name} was converted: {info}"
        message = info["error"]
    assert not (daemon.images / output).exists()
    return message


# -- 1. Prefect is not a back door -------------------------------------------------------

def _convert_deployment_id() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_deployment_by_name("convert-vm/hypervisord").id)


def test_prefect_api_refuses_a_client_without_the_credential(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    api_url = os.environ["PREFECT_API_URL"]
    deployment = _convert_deployment_id()
    secret = secret_file(tmp_path)
    body = {"parameters": {"request": {"source_path": str(secret)}}}
    with httpx.Client(timeout=10) as anonymous:
        for method, path, payload in (
            ("POST", f"/deployments/{deployment}/create_flow_run", body),
            ("POST", "/flow_runs/filter", {}),
            ("GET", f"/deployments/{deployment}", None),
            ("POST", "/deployments/filter", {}),
        ):
            answer = anonymous.request(method, f"{api_url}{path}", json=payload)
            assert answer.status_code == 401, (path, answer.text)
        wrong = anonymous.post(f"{api_url}/flow_runs/filter", json={},
                               auth=("hypersdk", "guessed"))
        assert wrong.status_code == 401
        assert anonymous.get(f"{api_url}/health").status_code == 200  # probes stay open


def test_a_run_made_through_prefect_with_an_escaping_path_is_refused_by_the_flow(
    daemon: Daemon, api: httpx.Client, tmp_path: Path
) -> None:
    """Even with the credential (an operator's script, the UI, a schedule), the flow
    re-checks its parameters as the REST API does."""
    from prefect.client.orchestration import get_client

    secret = secret_file(tmp_path)
    output = unique("stolen")
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            UUID(_convert_deployment_id()),
            parameters={"request": {"source_path": str(secret), "output_path": output}})
        # the parameter that once skipped confinement is no parameter of the served flow
        bypass = client.create_flow_run_from_deployment(
            UUID(_convert_deployment_id()),
            parameters={"request": {"source_path": str(secret)},
                        "output_root": str(tmp_path / "mine")})
    info = wait_for_job(api, str(run.id))
    assert info["status"] == "failed"
    assert "outside the configured roots" in info["error"], info["error"]
    assert not (daemon.images / output).exists()
    refused = wait_for_job(api, str(bypass.id))
    assert refused["status"] == "failed", refused  # the flow cannot even be called
    assert not (tmp_path / "mine").exists()


# -- 2. no file outside the allowed roots is read ---------------------------------------

def test_a_qcow2_backing_file_outside_the_roots_is_refused(api: httpx.Client, daemon: Daemon,
                                                           tmp_path: Path) -> None:
    secret = secret_file(tmp_path / "outside")
    absolute = create_qcow2(daemon.inbox / f"{unique('abs')}.qcow2",
                            "-b", str(secret), "-F", "raw")
    message = convert_outcome(api, daemon, absolute)
    assert "backing file" in message and "outside" in message, message
    relative = create_qcow2(daemon.inbox / f"{unique('rel')}.qcow2", "-u",
                            "-b", os.path.relpath(secret, daemon.inbox), "-F", "raw")
    message = convert_outcome(api, daemon, relative)
    assert "backing file" in message and "outside" in message, message
    spec = create_qcow2(daemon.inbox / f"{unique('json')}.qcow2", "-u", "-b",
                        f'json:{{"driver":"raw","file":{{"driver":"file","filename":"{secret}"}}}}',
                        "-F", "raw")
    message = convert_outcome(api, daemon, spec)
    assert "not a plain file name" in message, message


def test_a_vmdk_parent_and_a_qcow2_data_file_outside_are_refused(
    api: httpx.Client, daemon: Daemon, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    secret = secret_file(outside)
    parent = outside / "parent.vmdk"  # a VMDK's parent must be a VMDK
    qemu_img.convert(qemu_img.DiskSource(secret, "raw"), parent, output_format="vmdk")
    vmdk = daemon.inbox / f"{unique('child')}.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", str(parent), "-F", "vmdk",
                    str(vmdk)], check=True)
    message = convert_outcome(api, daemon, vmdk)
    assert "backing file" in message and "outside" in message, message
    data = outside / "data.raw"
    with_data = create_qcow2(daemon.inbox / f"{unique('data')}.qcow2",
                             "-o", f"data_file={data},data_file_raw=on")
    data.write_bytes(secret.read_bytes())
    message = convert_outcome(api, daemon, with_data)
    assert "data file" in message and "outside" in message, message


def test_a_backing_chain_inside_the_roots_is_converted_whole(
    api: httpx.Client, daemon: Daemon, tmp_path: Path
) -> None:
    base = secret_file(daemon.inbox / unique("chain"), "base.raw")
    top = create_qcow2(base.parent / "top.qcow2", "-b", "base.raw", "-F", "raw")
    answer = convert(api, top, unique("chained"))
    assert answer.status_code == 200, answer.text
    info = wait_for_job(api, answer.json()["job_id"])
    assert info["status"] == "completed", info["error"]
    disk = Path(info["result"]["disks"][0]["path"])
    assert qemu_img.compare(base, disk)  # flattened: the base's bytes are in the output


def test_a_symlink_in_the_inbox_is_confined_like_every_path(
    api: httpx.Client, daemon: Daemon, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path / "outside")
    name = unique("s")
    (daemon.inbox / f"{name}.raw").symlink_to(secret)
    listed = api.post("/vms/list", json={"provider": "local"}).json()
    assert name not in [vm["identifier"] for vm in listed["vms"]]
    answer = api.post("/jobs/submit", json={"vm_identifier": name})
    assert answer.status_code == 422, answer.text
    assert "outside" in answer.json()["message"]
    assert not domain_defined(name)
    # a symlink that stays inside the inbox is just another name for a VM there
    inside = secret_file(daemon.inbox / unique("real"), "disk.raw")
    alias = unique("alias")
    (daemon.inbox / f"{alias}.raw").symlink_to(inside)
    info = api.get("/vms/info", params={"identifier": alias, "provider": "local"})
    assert info.status_code == 200, info.text
    assert info.json()["disks"][0]["format"] == "raw"


# -- 3. formats are checked, not believed ------------------------------------------------

def test_a_file_that_lies_about_its_format_is_refused(api: httpx.Client,
                                                      daemon: Daemon) -> None:
    name = unique("g")
    liar = daemon.inbox / f"{name}.vmdk"
    liar.write_bytes(os.urandom(10 * 2**20))
    answer = api.post("/jobs/submit", json={"vm_identifier": name})
    assert answer.status_code == 422, answer.text
    message = answer.json()["message"]
    assert f"{name}.vmdk claims to be a VMDK but is data with no disk image signature" in message
    assert not domain_defined(name)
    assert "claims to be a VMDK" in convert_outcome(api, daemon, liar)

    qcow2_named_raw = create_qcow2(daemon.inbox / f"{unique('q')}.raw")
    assert "claims to be a raw disk but is a qcow2 image" in convert_outcome(
        api, daemon, qcow2_named_raw)
    odd = daemon.inbox / f"{unique('odd')}.raw"
    odd.write_bytes(b"\0" * 1000)
    assert "not a multiple of 512" in convert_outcome(api, daemon, odd)
    text = daemon.inbox / f"{unique('t')}.qcow2"
    text.write_text("#!/bin/sh\necho not a disk\n" * 40)
    assert "claims to be a qcow2 image but is text" in convert_outcome(api, daemon, text)


# -- 4. secrets at rest ------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_holding_webhook_secrets_is_private(api: httpx.Client,
                                                         daemon: Daemon) -> None:
    answer = api.post("/webhooks/configure", json={
        "url": "http://127.0.0.1:9/hook", "events": ["job.failed"],
        "headers": {"Authorization": "Bearer do-not-leak"}})
    assert answer.status_code == 200, answer.text
    database = daemon.root / "db" / "hypersdk.db"
    assert mode(database.parent) == 0o700
    for part in (database, database.with_name("hypersdk.db-wal")):
        assert mode(part) == 0o600, part
    api.delete(f"/webhooks/{answer.json()['id']}")


def test_existing_files_are_tightened_and_new_ones_born_private(tmp_path: Path) -> None:
    from api.daemon import protect_data_dir
    from api.prefect_server import server_credential
    from api.webhooks import WebhookStore
    from core.config import parse_config

    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    database = folder / "hypersdk.db"
    database.write_bytes(b"")
    database.chmod(0o644)
    settings = parse_config({"database": {"path": str(database)},
                             "export": {"base_path": str(tmp_path / "exports")},
                             "hyper2kvm": {"output_dir": str(tmp_path / "images")},
                             "providers": {"local": {"path": str(tmp_path / "inbox")}}})
    protect_data_dir(settings)
    WebhookStore(database).close()
    assert mode(folder) == 0o700 and mode(database) == 0o600
    credential = server_credential(folder / "prefect")
    assert credential.startswith("hypersdk:") and len(credential) > 40
    assert mode(folder / "prefect") == 0o700
    assert mode(folder / "prefect" / "auth_string") == 0o600
    assert server_credential(folder / "prefect") == credential  # kept across restarts
    # images inside the data folder: qemu (another user) must pass through, not list
    shared = parse_config({"database": {"path": str(tmp_path / "hypersdk.db")},
                           "hyper2kvm": {"output_dir": str(tmp_path / "images")}})
    protect_data_dir(shared)
    assert mode(tmp_path) == 0o711


# -- 5. limits ---------------------------------------------------------------------------

def test_the_key_is_checked_before_the_body_is_read(daemon: Daemon) -> None:
    with daemon.client(key=None) as anonymous:
        malformed = anonymous.post("/jobs/submit", content=b'{"vm_identifier": ',
                                   headers={"Content-Type": "application/json"})
        assert malformed.status_code == 401, malformed.text
        huge = anonymous.post("/jobs/submit", content=b"x" * (5 * 2**20))
        assert huge.status_code == 401
        unknown = anonymous.get("/no/such/path")
        assert unknown.status_code == 401


def test_bodies_over_the_limit_get_413_before_they_are_buffered(api: httpx.Client) -> None:
    big = b'{"vm_identifier": "' + b"a" * (2 * 2**20) + b'"}'
    declared = api.post("/jobs/submit", content=big,
                        headers={"Content-Type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert "over the limit of 1048576 bytes" in declared.json()["message"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"vm_identifier": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    streamed = api.post("/jobs/submit", content=chunks(),
                        headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    assert api.get("/health").status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"export_path": "x" * 600_000}, "export_path"),
    ({"export_path": "a/" + "b" * 256 + "/c"}, "export_path"),
    ({"export_path": "nul\u0000byte"}, "export_path"),
])
def test_paths_no_os_accepts_are_refused_naming_the_field(api: httpx.Client, sample_vm: str,
                                                          body: dict, field: str) -> None:
    answer = api.post("/jobs/submit", json={"vm_identifier": sample_vm, **body})
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["message"]
    long_source = api.post("/convert", json={"source_path": "/" + "s" * 300})
    assert long_source.status_code == 422 and "source_path" in long_source.json()["message"]
    long_query = api.get("/parse-vmdk", params={"path": "/" + "p" * 5000})
    assert long_query.status_code == 422 and "path" in long_query.json()["message"]


# -- 6. the whole API, as a fuzzer and as a stranger see it ------------------------------

@pytest.fixture(scope="module")
def own_daemon(libvirt_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A hypervisord with its own embedded Prefect server: schedules and policies a fuzzer
    creates fire there, not among the session's jobs."""
    daemon = start_daemon(tmp_path_factory.mktemp("fuzzed"), api_key="fuzz-" + unique(),
                          embedded=True)
    yield daemon
    assert stop_daemon(daemon) == 0


def test_every_operation_but_health_refuses_a_client_without_the_key(
        own_daemon: Daemon) -> None:
    spec = httpx.get(f"{own_daemon.url}/openapi.json").json()
    operations = [(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item if method in ("get", "post", "put", "delete", "patch")]
    assert len(operations) >= 30
    with own_daemon.client(key=None) as anonymous:
        for method, path in operations:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            answer = anonymous.request(method, concrete, json={})
            expected = 200 if path == "/health" else 401
            assert answer.status_code == expected, (method, path, answer.text)


@pytest.mark.timeout(900 + 120)  # schemathesis alone may take its 900 s
def test_a_fuzzer_on_the_openapi_spec_finds_no_error_and_no_lie(own_daemon: Daemon,
                                                                tmp_path: Path) -> None:
    """schemathesis, every check (server errors, status codes, content types and bodies
    against the spec, Allow headers, auth, ...), every operation with generated valid and
    invalid input (bounded): not one failure. Webhook URLs are left out: they would send
    requests off this host."""
    done = subprocess.run(
        [str(BIN / "st"), "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
         "run", f"{own_daemon.url}/openapi.json",
         "-H", f"Authorization: Bearer {own_daemon.api_key}",
         "--max-examples", "10", "--no-shrink",
         "--exclude-path", "/webhooks/configure", "--exclude-path-regex", "/webhooks/.*/test",
         "--request-timeout", "30", "--seed", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    summary = done.stdout[-4000:]
    assert done.returncode == 0, summary
    assert re.search(r"\d+ generated", done.stdout), summary
