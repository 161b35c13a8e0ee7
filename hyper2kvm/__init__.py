"""hyper2kvm: turn exported VMs (OVA, OVF, VMDK and other disk images) into KVM guests."""

__version__ = "0.1.0"
