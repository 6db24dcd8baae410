"""Pure builders: gpumesh specs plus placement in, KubeRay manifests out."""
