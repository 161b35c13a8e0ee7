"""VMDK metadata parsed by our code, on files qemu-img writes in each subformat."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.errors import InvalidRequest
from hyper2kvm import ova
from hyper2kvm.sample import make_sample_ova
from hyper2kvm.vmdk import parse_vmdk

MIB = 2**20


def create(folder: Path, name: str, subformat: str, *extra: str) -> Path:
    path = folder / f"{name}.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    f"subformat={subformat},adapter_type=lsilogic", *extra, str(path), "64M"],
                   check=True)
    return path


@pytest.mark.parametrize(
    ("subformat", "kind", "sparse", "compressed"),
    [
        ("monolithicSparse", "SPARSE", True, False),
        ("monolithicFlat", "FLAT", False, False),
        ("twoGbMaxExtentSparse", "SPARSE", True, False),
        ("twoGbMaxExtentFlat", "FLAT", False, False),
        ("streamOptimized", "SPARSE", True, True),
    ],
)
def test_each_subformat_qemu_img_writes(tmp_path: Path, subformat: str, kind: str,
                                        sparse: bool, compressed: bool) -> None:
    info = parse_vmdk(create(tmp_path, "disk", subformat))
    assert info.create_type == subformat
    assert info.capacity_bytes == 64 * MIB
    assert info.adapter_type == "lsilogic"
    assert info.geometry is not None and info.geometry[1:] == (255, 63)
    assert {e.kind for e in info.extents} == {kind}
    assert not info.has_parent and info.cid and len(info.cid) == 8
    assert (info.header is not None) is sparse
    if info.header:
        assert info.header.grain_size_sectors == 128
        assert info.header.compressed is compressed
        assert info.header.has_markers is compressed
        assert info.header.compression == ("deflate" if compressed else "none")


def test_parent_chain_is_read(tmp_path: Path) -> None:
    parent = parse_vmdk(create(tmp_path, "base", "monolithicSparse"))
    child_path = tmp_path / "child.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
                    str(child_path)], check=True, cwd=tmp_path)
    child = parse_vmdk(child_path)
    assert child.has_parent and child.parent_cid == parent.cid
    assert child.parent_hint == "base.vmdk"


def test_vmfs_descriptor(tmp_path: Path) -> None:
    (tmp_path / "esx-flat.vmdk").write_bytes(b"\0" * 4096)
    (tmp_path / "esx.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\n'
        'parentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\n'
        'RW 8 VMFS "esx-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n'
        'ddb.adapterType = "pvscsi"\nddb.geometry.cylinders = "1"\n'
        'ddb.geometry.heads = "255"\nddb.geometry.sectors = "63"\n'
        'ddb.virtualHWVersion = "14"\n')
    info = parse_vmdk(tmp_path / "esx.vmdk")
    assert (info.create_type, info.adapter_type, info.hw_version) == ("vmfs", "pvscsi", "14")
    assert info.capacity_bytes == 8 * 512 and info.extents[0].kind == "VMFS"


@pytest.mark.parametrize("extent", ["../outside-flat.vmdk", "/etc/passwd", "link/x-flat.vmdk"])
def test_extent_escaping_its_folder_is_refused(tmp_path: Path, extent: str) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    (tmp_path / "outside-flat.vmdk").write_bytes(b"\0" * 512)
    (folder / "link").symlink_to(tmp_path)
    (folder / "disk.vmdk").write_text(
        f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
        f'createType="monolithicFlat"\nRW 1 FLAT "{extent}" 0\n')
    with pytest.raises(InvalidRequest, match="escapes its folder"):
        parse_vmdk(folder / "disk.vmdk")


def test_missing_extent_and_garbage_are_refused(tmp_path: Path) -> None:
    flat = create(tmp_path, "gone", "monolithicFlat")
    (tmp_path / "gone-flat.vmdk").unlink()
    with pytest.raises(InvalidRequest, match="missing"):
        parse_vmdk(flat)
    junk = tmp_path / "junk.vmdk"
    junk.write_bytes(b"MZ" + b"\0" * 1000)
    with pytest.raises(InvalidRequest, match="not a VMDK"):
        parse_vmdk(junk)


def test_vmdk_inside_an_ova_is_read_in_place(tmp_path: Path) -> None:
    path = make_sample_ova(tmp_path, "in-ova", size_mib=16)
    member = ova.read_members(path)["in-ova-disk1.vmdk"]
    info = parse_vmdk(path, offset=member.offset, size=member.size)
    assert info.create_type == "streamOptimized" and info.capacity_bytes == 16 * MIB
    assert info.header is not None and info.header.compressed
