"""Google's image-export tool as gcloud runs it: which builder image Cloud Build pulls,
and the roles its two service accounts need (gcloud's daisy_utils checks both before an
export; so does validation here, and says what is missing)."""

from __future__ import annotations

import logging

from core.errors import AuthFailed, NotFound
from core.models import Blocker
from providers.gcp.session import Clients, call, map_error

log = logging.getLogger(__name__)
BUILDER_PROJECT = "compute-image-import"
EXECUTABLE = "gce_vm_image_export"
# where the builder is published in every region Artifact Registry serves it from, and the
# image gcloud used before (still there, and the fallback)
REGIONAL_TOOL = f"{{region}}-docker.pkg.dev/{BUILDER_PROJECT}/wrappers/{EXECUTABLE}:release"
LEGACY_TOOL = f"gcr.io/compute-image-tools/{EXECUTABLE}:release"

# the roles gcloud grants before an image export: the Cloud Build service account runs the
# tool, which starts its worker VM as the Compute service account
BUILD_ROLES = ("roles/compute.admin", "roles/iam.serviceAccountTokenCreator",
               "roles/iam.serviceAccountUser")
WORKER_ROLES = ("roles/compute.storageAdmin", "roles/storage.objectAdmin")


def region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def export_tool(clients: Clients, zone: str) -> str:
    """The builder image for a worker in `zone`: the regional one where Artifact Registry
    has the package (gcloud's choice now), else the gcr.io one."""
    region = region_of(clients.config.export_zone or zone)
    package = (f"projects/{BUILDER_PROJECT}/locations/{region}/repositories/wrappers/"
               f"packages/{EXECUTABLE}")
    try:
        clients.artifacts.get_package(name=package)
    except Exception as exc:  # noqa: BLE001 - mapped
        error = map_error(exc, f"the export tool's builder in {region}")
        if not isinstance(error, NotFound | AuthFailed):
            raise error from None
        log.info("no regional builder of the export tool in %s (%s): using %s", region,
                 error, LEGACY_TOOL)
        return LEGACY_TOOL
    return REGIONAL_TOOL.format(region=region)


def role_blockers(clients: Clients) -> list[Blocker]:
    """The roles of the project's IAM policy that the tool's service accounts lack (the
    Compute one needs none beyond roles/editor). Unchecked, with a warning, where the
    caller may not read the policy: the build then says what fails."""
    resource = f"projects/{clients.project}"
    try:
        number = call(lambda: clients.projects.get_project(name=resource),
                      f"GCP {resource}").name.split("/")[-1]
        policy = call(lambda: clients.projects.get_iam_policy(request={"resource": resource}),
                      f"GCP {resource}: IAM policy")
    except AuthFailed as exc:
        log.warning("the export tool's roles not checked: %s", exc)
        return []
    worker = clients.config.export_service_account or (
        f"{number}-compute@developer.gserviceaccount.com")
    worker_member = f"serviceAccount:{worker}"
    needs = {f"serviceAccount:{number}@cloudbuild.gserviceaccount.com": BUILD_ROLES,
             worker_member: WORKER_ROLES}
    blockers = []
    for member, roles in needs.items():
        held = {binding.role for binding in policy.bindings if member in binding.members}
        if member == worker_member and "roles/editor" in held:
            continue
        missing = [role for role in roles if role not in held]
        if missing:
            commands = "; ".join(f"gcloud projects add-iam-policy-binding {clients.project} "
                                 f"--member={member} --role={role}" for role in missing)
            blockers.append(Blocker(code="service_account_roles_missing", message=(
                f"GCP's image export tool runs as {member.split(':', 1)[1]}, which lacks "
                f"{', '.join(missing)} in project {clients.project}: {commands}")))
    return blockers
