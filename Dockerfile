# The image of the KubeRay deployment (configs/kuberay-rayservice.yaml): Ray's CUDA image with this project
# installed in place, so that `import_path: graphs.app:build_app` resolves on every node and configs/ stays beside
# the code. No weights inside: they come from the models volume.
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/imagegen
COPY --chown=ray:users pyproject.toml README.md serve_config.yaml ./
COPY --chown=ray:users configs configs
COPY --chown=ray:users deployments deployments
COPY --chown=ray:users graphs graphs
RUN pip install --no-cache-dir -e '.[gpu]'
