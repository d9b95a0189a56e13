# The delivery worker's image: `python worker.py` by default. The same image runs the codec server
# (`python -m delivery.codec_server --host 0.0.0.0 --port 8081`) and the SP-API stand-in
# (`python -m devstack.spapi --host 0.0.0.0 --port 8701 --seed devstack/seed.json`) with another command;
# docker-compose.yml does both. Runtime dependencies only: the `dev` extra is not installed.
FROM python:3.11.15-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user with a fixed uid, so volume permissions and Kubernetes runAsUser are predictable.
RUN groupadd --system --gid 10001 outbound \
    && useradd --system --uid 10001 --gid outbound --home-dir /home/outbound --create-home \
       --shell /usr/sbin/nologin outbound

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
    > /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Then the project itself (files and folders picked by .dockerignore), installed without its dependencies.
COPY . .
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER outbound

CMD ["python", "worker.py"]
