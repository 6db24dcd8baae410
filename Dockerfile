# One image for the operator and the node agent: `gpumesh operator run`, `gpumesh agent run`.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src src
COPY operator operator
COPY node_agent node_agent
# pyproject.toml maps operator/ and node_agent/ to gpumesh.operator and gpumesh.node_agent.
# EXTRAS=mesh,gpu adds CuPy for the agent's proof of GPU (large; the operator needs none).
ARG EXTRAS=mesh
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

FROM python:3.12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends wireguard-tools iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The operator chart runs as 65532; the agent chart adds NET_ADMIN for WireGuard.
USER 65532
ENTRYPOINT ["gpumesh"]
