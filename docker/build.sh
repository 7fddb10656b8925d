#!/usr/bin/env bash
# Build a wsi-prune image with podman (or docker), tagged with a hash of everything that goes
# into it, so that a second build of the same sources is skipped in well under a second.
#
#   docker/build.sh [cpu|gpu]          build, or reuse, IMAGE:cpu; prints the image's name last
#   docker/build.sh --hash [cpu|gpu]   print the image's hash and its deps stage's (the tags')
#   docker/build.sh --cached [cpu|gpu] exit 0 when a build would be quick: the image of these
#                                      sources exists, or at least its deps stage does
#   docker/build.sh --clean            remove every IMAGE:* image and this script's build cache
#
# Tags: IMAGE:FLAVOUR and IMAGE:FLAVOUR-<hash>. The hash covers the Dockerfile, .dockerignore,
# the build context (pyproject.toml, README.md, wsi_prune/, pipelines/; no __pycache__), the
# build args and the base image's id. The deps stage (torch and the dependencies: most of the
# size and of the build time) is tagged IMAGE:FLAVOUR-deps-<hash of the Dockerfile,
# pyproject.toml, build args and base>, so that --cached can tell whether a build reuses it. A
# build removes the previous tags of both kinds, so old images do not pile up (the CPU image
# is ~6 GB where torch is the CUDA build).
#
# Environment (prefixed: CI machines set IMAGE, BASE and the like for their own purposes):
#   WSI_ENGINE       podman or docker (default: podman when installed, else docker)
#   WSI_IMAGE_NAME   image name (default wsi-prune)
#   WSI_BASE         base image, the build arg BASE (default: the Dockerfile's, python:3.11-slim)
#   TORCH_INDEX_URL  torch's wheel index (default: the Dockerfile's, PyTorch's CPU or CUDA one)
#   WSI_IMAGE_LOCAL  1: build for a machine with no registry and only a PyPI mirror, as set up by
#                    ../shared/containers/setup.sh (local Debian base, host network and CA bundle,
#                    torch from pip's index, local wheel folders /opt/pypi*/files mounted, podman
#                    only). 0: never. auto (default): 1 when WSI_BASE is unset and the setup
#                    script's base image exists.
#   FORCE=1          build even when an image with the same hash exists
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${WSI_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
IMAGE=${WSI_IMAGE_NAME:-wsi-prune}
BASE=${WSI_BASE:-}
LOCAL_BASE=localhost/debian-min:bookworm
CA=/etc/ssl/certs/ca-certificates.crt

mode=build
case "${1:-}" in
  --hash) mode=hash; shift ;;
  --cached) mode=cached; shift ;;
  --clean) mode=clean; shift ;;
esac
FLAVOUR=${1:-cpu}
case "$FLAVOUR" in
  cpu) DOCKERFILE=docker/Dockerfile ;;
  gpu) DOCKERFILE=docker/Dockerfile.gpu ;;
  *) echo "usage: $0 [--hash|--cached|--clean] [cpu|gpu]" >&2; exit 2 ;;
esac

if [[ $mode == clean ]]; then
  # our tags, then the untagged intermediate images our stages labelled (build cache)
  "$ENGINE" images --format '{{.Repository}}:{{.Tag}}' \
    | grep -E "^(localhost/)?${IMAGE}:" | xargs -r "$ENGINE" rmi >/dev/null || true
  "$ENGINE" image prune -f --filter label=org.wsi-prune.stage >/dev/null
  echo "removed ${IMAGE}:* and the build cache"
  exit 0
fi

local_mode=${WSI_IMAGE_LOCAL:-auto}
if [[ $local_mode == auto ]]; then
  local_mode=0
  if [[ -z ${BASE:-} ]] && "$ENGINE" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    local_mode=1
  fi
fi

args=()
mounts=()
if [[ $local_mode == 1 ]]; then
  BASE=${BASE:-$LOCAL_BASE}
  # only PyPI is reachable: torch comes from pip's index (the CUDA build on x86_64)
  TORCH_INDEX_URL=${TORCH_INDEX_URL-}
  mounts+=(--network host -v "$CA:/etc/ssl/certs/host-ca.crt:ro")
  args+=(--build-arg PIP_CERT=/etc/ssl/certs/host-ca.crt)
  links=()
  for d in /opt/pypi/files /opt/pypi-more/files; do
    # pip prefers a --find-links file to an index download of the same wheel: no multi-GB fetch
    if [[ -d $d ]]; then mounts+=(-v "$d:$d:ro"); links+=("$d"); fi
  done
  if (( ${#links[@]} )); then args+=(--build-arg "PIP_FIND_LINKS=${links[*]}"); fi
fi
[[ -n ${BASE:-} ]] && args+=(--build-arg "BASE=$BASE")
[[ -n ${TORCH_INDEX_URL+set} ]] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")

# inputs_hash FILE...: sha256 (16 hex) of the flavour, the base image's id, the build args, the
# text in $EXTRA and the files' contents
inputs_hash() {
  local base_id=${BASE:-default}
  if [[ -n ${BASE:-} ]]; then
    base_id=$("$ENGINE" image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || echo "$BASE")
  fi
  {
    printf '%s\n' "$FLAVOUR" "$base_id" "${args[@]}" "${EXTRA:-}"
    if (( $# )); then
      find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum
    fi
  } | sha256sum | cut -c1-16
}
exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

HASH=$(inputs_hash "$DOCKERFILE" .dockerignore pyproject.toml README.md wsi_prune pipelines)
# The deps stage is keyed like the build cache keys it: the instructions of the stages up to it
# (comments dropped: editing them rebuilds nothing) and the dependency list of pyproject.toml
# (the whole file where python3 cannot read it).
deps_stage() {
  sed -n '/^ARG BASE=/p; /^FROM .* AS python$/,/^FROM deps AS app$/p' "$DOCKERFILE" | grep -v '^#'
  python3 -c "import tomllib
print(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'])" 2>/dev/null \
    || cat pyproject.toml
}
DEPS_HASH=$(EXTRA=$(deps_stage) inputs_hash)
if [[ $mode == hash ]]; then echo "$HASH $DEPS_HASH"; exit 0; fi

TAG="$IMAGE:$FLAVOUR-$HASH"
DEPS_TAG="$IMAGE:$FLAVOUR-deps-$DEPS_HASH"
if [[ $mode == cached ]]; then
  if exists "$TAG"; then echo "image $TAG exists"; exit 0; fi
  if exists "$DEPS_TAG"; then echo "deps stage $DEPS_TAG exists: the build reuses it"; exit 0; fi
  echo "neither $TAG nor its deps stage $DEPS_TAG exists on this machine"
  exit 1
fi
if [[ ${FORCE:-0} != 1 ]] && exists "$TAG"; then
  echo "up to date: $TAG" >&2
  "$ENGINE" tag "$TAG" "$IMAGE:$FLAVOUR"
  echo "$TAG"
  exit 0
fi

old=$("$ENGINE" images --format '{{.Repository}}:{{.Tag}}' \
      | grep -E "^(localhost/)?${IMAGE}:${FLAVOUR}-(deps-)?[0-9a-f]{16}$" \
      | grep -v -e "-$HASH$" -e "-deps-$DEPS_HASH$" || true)
build() { "$ENGINE" build "${mounts[@]}" "${args[@]}" -f "$DOCKERFILE" "$@" . >&2; }
t0=$SECONDS
build --target deps -t "$DEPS_TAG"
build --label "org.wsi-prune.source-hash=$HASH" -t "$TAG" -t "$IMAGE:$FLAVOUR"
echo "built $TAG in $((SECONDS - t0)) s" >&2
# untag earlier builds (an image left with no tag is removed with it), then drop the untagged
# stage results our stages labelled: earlier builds' layers would otherwise stay (GBs each);
# this build's deps stage is tagged and stays, the small stages after it rebuild in seconds
if [[ -n $old ]]; then xargs -r "$ENGINE" rmi <<<"$old" >/dev/null 2>&1 || true; fi
"$ENGINE" image prune -f --filter label=org.wsi-prune.stage >/dev/null 2>&1 || true
echo "$TAG"
