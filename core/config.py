"""Configuration: the seed's config.yaml, `${VAR}` expanded from the environment,
validated by pydantic with unknown keys refused."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from core.errors import ConfigError
from core.models import GuestMode

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _parse_duration(value: Any) -> float:
    """'5s', '2h', '500ms' or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 5s, 10m, 2h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


Duration = Annotated[float, BeforeValidator(_parse_duration)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def default_data_dir() -> Path:
    """/var/lib/hypersdk for root, ~/.local/share/hypersdk otherwise."""
    if os.environ.get("HYPERSDK_DATA_DIR"):
        return Path(os.environ["HYPERSDK_DATA_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/hypersdk")
    return Path.home() / ".local" / "share" / "hypersdk"


class DaemonConfig(Section):
    address: str = "127.0.0.1:8080"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int = Field(default=4, ge=1, le=256)
    api_key: SecretStr | None = None
    prefect_ui_port: int = Field(default=4200, ge=1, le=65535)
    # the embedded Prefect server: where it listens, and the "user:password" its API and
    # UI require (generated at first start into <data dir>/prefect/auth_string if unset)
    prefect_host: str = "127.0.0.1"
    prefect_auth_string: SecretStr | None = None
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)  # larger bodies get 413
    # GET /metrics without the API key (for a Prometheus that cannot send one)
    metrics_public: bool = False
    # SIGTERM: running jobs get this long to finish; the rest resume at the next start
    shutdown_grace: Duration = 300.0
    # jobs a dead daemon left running run again at the next start, finished steps kept
    resume_interrupted: bool = True
    # webhooks: networks a webhook URL may resolve into although loopback or link-local
    # (refused otherwise), and the delivery retry schedule (exponential from base)
    webhook_allowed_networks: list[str] = Field(default_factory=list)
    webhook_retry_base: Duration = 5.0
    webhook_retry_max: Duration = 600.0
    webhook_max_attempts: int = Field(default=15, ge=1, le=100)

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"not a network: {network!r} (e.g. 127.0.0.0/8)") from None
        return value

    @field_validator("prefect_auth_string")
    @classmethod
    def _user_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and ":" not in value.get_secret_value():
            raise ValueError("expected USER:PASSWORD")
        return value

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


class ProviderConfig(Section):
    enabled: bool = True


class LocalProviderConfig(ProviderConfig):
    path: Path = Field(default_factory=lambda: default_data_dir() / "inbox")


class VSphereProviderConfig(ProviderConfig):
    host: str
    username: str
    password: SecretStr
    insecure: bool = False
    ca_file: Path | None = None
    thumbprint: str | None = None
    connection_pool_size: int = Field(default=5, ge=1, le=64)


class AWSProviderConfig(ProviderConfig):
    """Credentials: the access key pair, else `profile`, else boto3's standard chain
    (environment, shared files, instance role); `role_arn` is then assumed."""

    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = None
    role_arn: str | None = None
    endpoint_url: str | None = None  # one endpoint for EC2, EBS, S3 and STS (compatible clouds)
    ca_file: Path | None = None  # CA bundle for the endpoints' TLS
    export_bucket: str | None = None  # S3 bucket of the export-task transport

    @field_validator("secret_access_key")
    @classmethod
    def _pair(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if (value is None) != (info.data.get("access_key_id") is None):
            raise ValueError("access_key_id and secret_access_key go together")
        return value


class AzureProviderConfig(ProviderConfig):
    """A service principal (tenant, client id and secret), else azure-identity's default
    chain (environment, managed identity, Azure CLI)."""

    subscription_id: str
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    resource_groups: list[str] = Field(default_factory=list)  # where to look; all when empty
    # another cloud (sovereign, or a test stand-in): ARM endpoint, login authority, CA file
    arm_endpoint: str = "https://management.azure.com"
    authority: str = "https://login.microsoftonline.com"
    ca_file: Path | None = None


class GCPProviderConfig(ProviderConfig):
    """A service account's JSON key file, else Application Default Credentials."""

    project: str
    zones: list[str] = Field(default_factory=list)  # where to look; all when empty
    credentials_file: Path | None = None
    export_bucket: str | None = None  # GCS bucket the image exports are written to
    export_format: Literal["qcow2", "vmdk"] = "qcow2"  # what the export build writes
    # where the image-export tool starts its worker VM (its -network, -subnet, -zone) and
    # as whom (-compute_service_account); unset, the tool uses the project's "default"
    # network, which many projects do not have
    export_network: str | None = None
    export_subnet: str | None = None  # needed on a custom-mode network
    export_zone: str | None = None
    export_service_account: str | None = None
    # another endpoint (a private one, or a test stand-in): Compute, Cloud Build, Storage,
    # Resource Manager (the IAM policy the export's roles are checked in), Artifact Registry
    # (where the export tool's regional builder is looked for)
    compute_endpoint: str | None = None
    cloudbuild_endpoint: str | None = None
    storage_endpoint: str | None = None
    resourcemanager_endpoint: str | None = None
    artifactregistry_endpoint: str | None = None


class HyperVProviderConfig(ProviderConfig):
    """A Hyper-V host driven by PowerShell over WinRM, its disks read over SMB 3 from
    `export_share` (with the share's own credentials, else the same ones)."""

    host: str  # the WinRM endpoint: HOST, HOST:PORT (5986 with TLS, 5985 without)
    username: str
    password: SecretStr
    transport: Literal["ntlm", "kerberos", "credssp", "basic"] = "ntlm"
    tls: bool = True  # https; basic authentication is refused without it
    cert_validation: bool = True
    ca_file: Path | None = None  # CA bundle for the WinRM endpoint's certificate
    # the SMB share the provider reads: \\server\share or smb://server[:port]/share
    export_share: str | None = None
    # the share's folder as the Hyper-V host sees it (D:\Exports): disks under it are read in
    # place, and the host's Export-VM / Convert-VHD write there; default: the share's UNC
    share_path: str | None = None
    share_username: str | None = None
    share_password: SecretStr | None = None

    @field_validator("tls")
    @classmethod
    def _basic_needs_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("transport") == "basic":
            raise ValueError("basic authentication sends the password as it is: use it with "
                             "tls: true only")
        return value

    @field_validator("export_share")
    @classmethod
    def _share(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(
                r"(\\\\[^\\/]+\\[^\\/]+|smb://[^/]+/[^/]+)[\\/]?", value):
            raise ValueError(f"expected \\\\SERVER\\SHARE or smb://SERVER[:PORT]/SHARE, "
                             f"got {value!r}")
        return value


class OCIProviderConfig(ProviderConfig):
    """An API signing key: `tenancy`, `user`, `fingerprint` and `key_file` or `key_content`
    here, else the OCI config file's `profile`."""

    config_file: Path | None = None  # default: ~/.oci/config
    profile: str = "DEFAULT"
    tenancy: str | None = None
    user: str | None = None
    fingerprint: str | None = None
    key_file: Path | None = None
    key_content: SecretStr | None = None
    region: str | None = None
    compartment_id: str | None = None  # where to look; the tenancy's root when unset
    export_bucket: str | None = None  # Object Storage bucket the image exports go to
    namespace: str | None = None  # its namespace; asked from Object Storage when unset
    # another endpoint (a test stand-in): Compute, Networking, Block Storage, Work Requests
    compute_endpoint: str | None = None
    objectstorage_endpoint: str | None = None


class ProvidersConfig(Section):
    local: LocalProviderConfig | None = Field(default_factory=LocalProviderConfig)
    vsphere: VSphereProviderConfig | None = None
    aws: AWSProviderConfig | None = None
    azure: AzureProviderConfig | None = None
    gcp: GCPProviderConfig | None = None
    hyperv: HyperVProviderConfig | None = None
    oci: OCIProviderConfig | None = None

    def enabled(self) -> dict[str, ProviderConfig]:
        """Providers configured and not disabled, by name."""
        return {
            name: section
            for name in type(self).model_fields
            if isinstance(section := getattr(self, name), ProviderConfig) and section.enabled
        }


class UefiFirmware(Section):
    """The OVMF build UEFI VMs get, instead of the one libvirt picks from its firmware
    descriptors (a custom or vendor build, one this host's descriptors do not list)."""

    code: Path  # the firmware, read-only (e.g. /usr/share/OVMF/OVMF_CODE_4M.fd)
    vars: Path  # the template each domain's own NVRAM starts from (OVMF_VARS_4M.fd)
    secure_boot: bool = False  # a Secure Boot build (with SMM): VMs that use Secure Boot


class Hyper2kvmConfig(Section):
    path: str = "hyper2kvm"
    daemon_enabled: bool = False
    watch_dir: Path = Field(default_factory=lambda: default_data_dir() / "watch")
    output_dir: Path = Field(default_factory=lambda: default_data_dir() / "images")
    default_format: Literal["qcow2", "raw"] = "qcow2"
    compression: bool = False
    poll_interval: Duration = 5.0
    job_timeout: Duration = 7200.0
    libvirt_uri: str = "qemu:///system"
    network: str = "default"  # libvirt network for NICs; "user" for user-mode networking
    network_map: dict[str, str] = Field(default_factory=dict)  # source network → libvirt
    storage_pools: bool = True  # each VM's output folder becomes pool hypersdk-<vm>
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    uefi_firmware: UefiFirmware | None = None  # None: libvirt picks (os firmware='efi')
    # guest conversion (virt-v2v-in-place) for jobs that do not say: "auto" converts where
    # it is installed and finds an OS it can convert; true: always, or fail the job
    convert_guest: GuestMode = "auto"
    guest_timeout: Duration = 3600.0
    virtio_win: Path | None = None  # a virtio-win ISO or folder: drivers for Windows guests
    verify_boot: Literal["off", "warn", "require"] = "warn"  # for jobs that do not say
    boot_timeout: Duration = 600.0


class ExportConfig(Section):
    base_path: Path = Field(default_factory=lambda: default_data_dir() / "exports")
    chunk_size: int = Field(default=10 * 1024 * 1024, ge=4096)
    max_retries: int = Field(default=3, ge=0, le=20)
    concurrent_exports: int = Field(default=2, ge=1, le=256)
    disk_concurrency: int = Field(default=2, ge=1, le=64)  # disks of one VM at once
    # parallel reads within one disk (EBS blocks, object ranges) for ranged transports
    part_concurrency: int = Field(default=8, ge=1, le=128)
    part_retries: int = Field(default=5, ge=0, le=20)  # per part (block, range), with backoff
    # how long one part keeps being retried while the service throttles or is busy (its
    # Retry-After honoured) before the export fails: waiting costs less than starting over
    throttle_budget: Duration = Field(default=600.0, ge=0)


class DatabaseConfig(Section):
    path: Path = Field(default_factory=lambda: default_data_dir() / "hypersdk.db")


class WebhookConfig(Section):
    url: str
    events: list[str] = Field(default_factory=lambda: ["job.completed", "job.failed"])
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    secret: SecretStr | None = None


class PoolConfig(Section):
    """Scale-out (`hypervisord deploy`, `hypervisord worker`): the Prefect work pool the
    conversion hosts serve, where every host and the API read task and flow results, and
    how soon a host that stopped answering has its runs marked Crashed."""

    name: str = Field(default="hypersdk", min_length=1, max_length=100,
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # a folder every host and the API mount at the same path, or the slug of a Prefect
    # storage block made beforehand (e.g. "s3-bucket/hypersdk-results")
    results: str | None = None
    # Prefect's flow-run heartbeat (its minimum is 30 s); a run silent for twice this long
    # is marked Crashed by an automation on the server
    heartbeat: Duration = Field(default=30.0, ge=30.0, le=3600.0)

    @field_validator("results")
    @classmethod
    def _results(cls, value: str | None) -> str | None:
        if value is None or value.startswith("/"):
            return value
        block_type, sep, name = value.partition("/")
        if not sep or not block_type or not name or "/" in name:
            raise ValueError("expected an absolute folder (/srv/hypersdk/results) or a "
                             f"storage block's slug (s3-bucket/NAME), got {value!r}")
        return value


class Config(Section):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    hyper2kvm: Hyper2kvmConfig = Field(default_factory=Hyper2kvmConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    pool: PoolConfig = Field(default_factory=PoolConfig)

    def source_roots(self) -> list[Path]:
        """Where conversions may read from: exports, converted images, the local inbox.
        Every file a disk reads (backing files, extents) must be inside one of them."""
        roots = [self.export.base_path, self.hyper2kvm.output_dir]
        if self.providers.local:
            roots.append(self.providers.local.path)
        return roots

    @property
    def api_key(self) -> str | None:
        """The API key: HYPERSDK_API_KEY wins over daemon.api_key."""
        env = os.environ.get("HYPERSDK_API_KEY")
        if env:
            return env
        return self.daemon.api_key.get_secret_value() if self.daemon.api_key else None


def _expand(value: Any, where: str) -> Any:
    """Replace ${VAR} (or ${VAR:-default}) in every string, recursively."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set")

    return _ENV_REF.sub(substitute, value)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "config") -> Config:
    """Validate an already-loaded mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(_expand(data, ""))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read config.yaml (or the defaults when there is no file)."""
    if path is None:
        return parse_config({}, source="defaults")
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(file))


CONFIG_ENV = "HYPERSDK_CONFIG"


def config_from_env() -> Config:
    """The config a flow run uses: the file named by HYPERSDK_CONFIG, else defaults. An
    empty HYPERSDK_CONFIG is refused: it is what a deployment made from an unset variable
    carries, and the defaults would silently stand in for the host's own config."""
    path = os.environ.get(CONFIG_ENV)
    if path is not None and not path.strip():
        raise ConfigError(f"{CONFIG_ENV} is set but empty; unset it or name this host's "
                          "config.yaml")
    return load_config(path)
