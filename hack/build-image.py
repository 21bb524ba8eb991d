#!/usr/bin/env python3
"""Builds a test container image from busybox-static, without any registry.

Writes an OCI image-layout tar with one layer (the static /bin/busybox, a symlink per applet,
/etc/passwd, /etc/group, /tmp), an image config with the given entrypoint/cmd, and the manifest
annotated `io.containerd.image.name=<ref>`, so `ctr -n k8s.io images import` names it.

    hack/build-image.py --ref kedge.local/busybox:test --out /tmp/busybox.tar \
        [--cmd sh -c 'sleep 3600']

Deterministic: the same inputs give the same digests (fixed mtimes, sorted entries).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def add_file(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 0
    tar.addfile(info)


def add_symlink(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = 0
    tar.addfile(info)


def applets(busybox):
    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a.strip() for a in out.split() if a.strip() and a.strip() != "busybox"})


def layer(busybox):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in ["bin", "etc", "tmp", "root", "var", "proc", "sys", "dev"]:
            add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        with open(busybox, "rb") as f:
            add_file(tar, "bin/busybox", f.read(), 0o755)
        for a in applets(busybox):
            add_symlink(tar, f"bin/{a}", "busybox")
        add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file(tar, "etc/group", b"root:x:0:\nnobody:x:65534:\n")
    diff = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as g:
        g.write(diff)
    return diff, gz.getvalue()


def blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    add_file(layout, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}", len(data)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="image reference, e.g. kedge.local/busybox:test")
    p.add_argument("--out", required=True, help="the OCI image-layout tar to write")
    p.add_argument("--busybox", default="/bin/busybox", help="a static busybox binary")
    p.add_argument("--cmd", nargs=argparse.REMAINDER, default=["sh"], help="the image's Cmd")
    args = p.parse_args()
    if not os.path.exists(args.busybox):
        sys.exit(f"error: {args.busybox} not found (apt-get install busybox-static)")

    diff, gz = layer(args.busybox)
    config = {
        "architecture": ARCH,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": args.cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(diff).hexdigest()]},
        "history": [{"created_by": "kedge hack/build-image.py"}],
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as layout:
        layer_digest, layer_size = blob(layout, gz)
        config_digest, config_size = blob(layout, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": layer_size}],
        }
        manifest_digest, manifest_size = blob(layout, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": ARCH, "os": "linux"},
                "annotations": {"io.containerd.image.name": args.ref,
                                "org.opencontainers.image.ref.name": args.ref.rsplit(":", 1)[-1]},
            }],
        }
        add_file(layout, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_file(layout, "index.json", json.dumps(index, sort_keys=True).encode())
    with open(args.out, "wb") as f:
        f.write(out.getvalue())


if __name__ == "__main__":
    main()
