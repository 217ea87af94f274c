# The image of the teamtrack services (bridge, dashboard, ingest, WebSockets gateway, device
# gateway, device simulators). Base images are pinned to a version (their digests are not
# recorded here: no registry was reachable where this file was written; add `@sha256:...` from
# `docker buildx imagetools inspect` where yours is).

# The page's browser libraries (Leaflet), from the lock file, as `make assets` installs them.
FROM node:20.18.1-bookworm-slim AS assets
WORKDIR /frontend
COPY dashboard/frontend/package.json dashboard/frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Every dependency at the version and hashes of the lock file (`make lock`), before the sources
# so that this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
# Only the sources are copied: ./state holds generated secrets and must never enter an image.
COPY pyproject.toml README.md ./
COPY teamtrack ./teamtrack
COPY bridge ./bridge
COPY dashboard ./dashboard
COPY devices ./devices
COPY ingest ./ingest
COPY rules ./rules
COPY wsgate ./wsgate
COPY gateway ./gateway
COPY mosquitto ./mosquitto
COPY --from=assets /frontend/node_modules/leaflet/dist/leaflet.js /frontend/node_modules/leaflet/dist/leaflet.css ./dashboard/static/vendor/leaflet/
COPY --from=assets /frontend/node_modules/leaflet/dist/images ./dashboard/static/vendor/leaflet/images
# Editable, like the development install, so that teamtrack finds mosquitto/ next to it; the
# dependencies are in already.
RUN pip install --no-deps -e .

# The user is chosen at run time (docker-compose.yml) to match the owner of the mounted ./state.
CMD ["python", "-m", "dashboard"]
