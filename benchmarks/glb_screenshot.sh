#!/usr/bin/env bash
# benchmarks/glb_screenshot.sh GLB OUT.png [orbit] -- the GLB in @google/model-viewer, headless Chromium screenshot
set -e
# Needs chromium and @google/model-viewer: npm install --prefix /tmp/mv @google/model-viewer (MV_DIR points there).
MV_DIR=${MV_DIR:-/tmp/mv}
glb=$(realpath "$1"); out=$(realpath -m "$2"); orbit=${3:-"30deg 75deg 105%"}
d=$(mktemp -d); cp "$glb" $d/m.glb; cp $MV_DIR/node_modules/@google/model-viewer/dist/model-viewer-umd.js $d/
cat > $d/index.html <<HTML
<html><body style="margin:0;background:#fff">
<script src="model-viewer-umd.js"></script>
<model-viewer src="m.glb" camera-orbit="$orbit" style="width:480px;height:480px" exposure="1" environment-image="neutral" interaction-prompt="none"></model-viewer>
</body></html>
HTML
port=$((8800 + RANDOM % 100))
(cd $d && exec timeout 90 python3 -m http.server $port >/dev/null 2>&1) &
sleep 1
for try in 1 2 3; do  # a blank page (model not loaded within the virtual time) is retried
  timeout 90 chromium --headless=new --no-sandbox --use-angle=swiftshader --enable-unsafe-swiftshader --ignore-gpu-blocklist \
    --window-size=480,480 --virtual-time-budget=30000 --screenshot="$out" http://localhost:$port/index.html >/dev/null 2>&1 || true
  [[ $(stat -c %s "$out" 2>/dev/null || echo 0) -gt 10000 ]] && break
done
kill %1 2>/dev/null || true
