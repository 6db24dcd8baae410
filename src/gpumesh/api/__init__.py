"""The gpumesh.io/v1alpha1 API: models shared by the operator, the agent and the CLI.

Import from the module that defines a name (``gpumesh.api.gpucluster``, ``.job``,
``.gpunode``, ``.gpuquota``, ``.manifests``): nothing is re-exported here, so the node
agent, which needs the GPUNode models only, never builds the others.
"""
