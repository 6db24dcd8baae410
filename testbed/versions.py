"""Every version the local control plane is built from, pinned in one place.

Bumping a version here changes the toolchain cache key (``<name>-<version>``), so a bump
rebuilds exactly the component that changed and nothing else.
"""

from __future__ import annotations

from typing import Final

KUBERNETES: Final = "v1.36.3"
"""k8s.io/kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler.

The staging modules are pinned at the matching v0.36.3 in ``gomod/kube/go.mod``.
"""

KUBERNETES_STAGING: Final = "v0.36.3"

ETCD: Final = "v3.6.8"
"""go.etcd.io/etcd/server/v3, built inside the kube wrapper module (k8s v1.36.3 requires it)."""

KWOK: Final = "v0.8.0"
"""sigs.k8s.io/kwok: fakes kubelets for the simulated supplier nodes."""

KUBERAY: Final = "v1.6.1"
"""github.com/ray-project/kuberay/ray-operator.

v1.7.0 was the intended pin, but the Go module proxy refuses its source zip
("403: This module version is not available"; its .info and .mod are served), so it
cannot be built from the proxy. v1.6.1 is the newest version the proxy serves; move to
v1.7.0 as soon as ``go mod download github.com/ray-project/kuberay/ray-operator@v1.7.0``
works.
"""

KUBERAY_WANTED: Final = "v1.7.0"

HELM: Final = "v3.21.4"
"""helm.sh/helm/v3: only for the kind path, which installs KubeRay from its chart."""

GO_MIN: Final = (1, 26)
"""The oldest Go that builds all of the above (k8s v1.36 and kwok v0.8 need 1.26)."""

KUBE_MODULE: Final = "k8s.io/kubernetes"
ETCD_MODULE: Final = "go.etcd.io/etcd/server/v3"
KWOK_MODULE: Final = "sigs.k8s.io/kwok"
KUBERAY_MODULE: Final = "github.com/ray-project/kuberay/ray-operator"
HELM_MODULE: Final = "helm.sh/helm/v3"
