// distill3d GLB viewer: a small self-contained WebGL2 viewer for the meshes distill3d exports.
// Reads a binary glTF (GLB) embedded in the page as base64, draws its triangle primitives with
// their baseColor texture (or vertex colours) under a headlight, and orbits (drag) and zooms
// (wheel / pinch). No dependencies, no network: the gallery must work from a folder, offline.
// Usage: a canvas of class "glb-viewer" whose data-glb attribute names the id of a script element
// of type application/octet-stream holding the GLB in base64.
(function () {
  "use strict";

  // ----- small matrix helpers (column-major, as WebGL expects) -----------------------------
  function mat4Identity() { return new Float32Array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]); }
  function mat4Mul(a, b) {
    const o = new Float32Array(16);
    for (let c = 0; c < 4; c++) for (let r = 0; r < 4; r++) {
      let s = 0;
      for (let k = 0; k < 4; k++) s += a[k * 4 + r] * b[c * 4 + k];
      o[c * 4 + r] = s;
    }
    return o;
  }
  function mat4FromTRS(t, q, s) {
    const [x, y, z, w] = q, [sx, sy, sz] = s;
    return new Float32Array([
      (1 - 2 * (y * y + z * z)) * sx, 2 * (x * y + z * w) * sx, 2 * (x * z - y * w) * sx, 0,
      2 * (x * y - z * w) * sy, (1 - 2 * (x * x + z * z)) * sy, 2 * (y * z + x * w) * sy, 0,
      2 * (x * z + y * w) * sz, 2 * (y * z - x * w) * sz, (1 - 2 * (x * x + y * y)) * sz, 0,
      t[0], t[1], t[2], 1]);
  }
  function perspective(fovy, aspect, near, far) {
    const f = 1 / Math.tan(fovy / 2), nf = 1 / (near - far);
    return new Float32Array([f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0]);
  }
  function lookAt(eye, target, up) {
    let zx = eye[0] - target[0], zy = eye[1] - target[1], zz = eye[2] - target[2];
    let l = Math.hypot(zx, zy, zz); zx /= l; zy /= l; zz /= l;
    let xx = up[1] * zz - up[2] * zy, xy = up[2] * zx - up[0] * zz, xz = up[0] * zy - up[1] * zx;
    l = Math.hypot(xx, xy, xz); xx /= l; xy /= l; xz /= l;
    const yx = zy * xz - zz * xy, yy = zz * xx - zx * xz, yz = zx * xy - zy * xx;
    return new Float32Array([xx, yx, zx, 0, xy, yy, zy, 0, xz, yz, zz, 0,
      -(xx * eye[0] + xy * eye[1] + xz * eye[2]), -(yx * eye[0] + yy * eye[1] + yz * eye[2]), -(zx * eye[0] + zy * eye[1] + zz * eye[2]), 1]);
  }
  function transformPoint(m, p) {
    return [m[0] * p[0] + m[4] * p[1] + m[8] * p[2] + m[12], m[1] * p[0] + m[5] * p[1] + m[9] * p[2] + m[13], m[2] * p[0] + m[6] * p[1] + m[10] * p[2] + m[14]];
  }

  // ----- GLB parsing ------------------------------------------------------------------------
  const COMPONENTS = { SCALAR: 1, VEC2: 2, VEC3: 3, VEC4: 4, MAT4: 16 };
  const ARRAYS = { 5120: Int8Array, 5121: Uint8Array, 5122: Int16Array, 5123: Uint16Array, 5125: Uint32Array, 5126: Float32Array };

  function parseGLB(buffer) {
    const view = new DataView(buffer);
    if (buffer.byteLength < 20 || view.getUint32(0, true) !== 0x46546c67) throw new Error("not a GLB file (bad magic)");
    if (view.getUint32(4, true) !== 2) throw new Error("unsupported glTF version " + view.getUint32(4, true));
    let offset = 12, json = null, bin = null;
    while (offset + 8 <= buffer.byteLength) {
      const length = view.getUint32(offset, true), type = view.getUint32(offset + 4, true);
      const start = offset + 8;
      if (type === 0x4e4f534a) json = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, start, length)));
      else if (type === 0x004e4942) bin = new Uint8Array(buffer, start, length);
      offset = start + length;
    }
    if (!json) throw new Error("GLB without a JSON chunk");
    return { json, bin };
  }

  // An accessor as a tightly packed typed array (copies when the buffer view is strided).
  function readAccessor(gltf, index) {
    const acc = gltf.json.accessors[index];
    const n = COMPONENTS[acc.type], Arr = ARRAYS[acc.componentType];
    if (!n || !Arr) throw new Error("unsupported accessor type " + acc.type + "/" + acc.componentType);
    const out = new Arr(acc.count * n);
    if (acc.bufferView === undefined) return out;
    const bv = gltf.json.bufferViews[acc.bufferView];
    if ((bv.buffer || 0) !== 0 || !gltf.bin) throw new Error("only GLB-embedded buffers are supported");
    const base = gltf.bin.byteOffset + (bv.byteOffset || 0) + (acc.byteOffset || 0);
    const stride = bv.byteStride || n * Arr.BYTES_PER_ELEMENT;
    if (stride === n * Arr.BYTES_PER_ELEMENT && base % Arr.BYTES_PER_ELEMENT === 0) {
      out.set(new Arr(gltf.bin.buffer, base, acc.count * n));
    } else {
      const bytes = new Uint8Array(gltf.bin.buffer);
      const tmp = new Uint8Array(out.buffer);
      const size = n * Arr.BYTES_PER_ELEMENT;
      for (let i = 0; i < acc.count; i++) tmp.set(bytes.subarray(base + i * stride, base + i * stride + size), i * size);
    }
    return out;
  }

  function toFloat(gltf, index) {
    const acc = gltf.json.accessors[index], data = readAccessor(gltf, index);
    if (data instanceof Float32Array) return data;
    const scale = acc.normalized ? { 5121: 255, 5123: 65535, 5120: 127, 5122: 32767 }[acc.componentType] : 1;
    return Float32Array.from(data, (v) => v / scale);
  }

  function smoothNormals(positions, indices) {
    const normals = new Float32Array(positions.length);
    for (let i = 0; i < indices.length; i += 3) {
      const a = indices[i] * 3, b = indices[i + 1] * 3, c = indices[i + 2] * 3;
      const ux = positions[b] - positions[a], uy = positions[b + 1] - positions[a + 1], uz = positions[b + 2] - positions[a + 2];
      const vx = positions[c] - positions[a], vy = positions[c + 1] - positions[a + 1], vz = positions[c + 2] - positions[a + 2];
      const nx = uy * vz - uz * vy, ny = uz * vx - ux * vz, nz = ux * vy - uy * vx;
      for (const k of [a, b, c]) { normals[k] += nx; normals[k + 1] += ny; normals[k + 2] += nz; }
    }
    for (let i = 0; i < normals.length; i += 3) {
      const l = Math.hypot(normals[i], normals[i + 1], normals[i + 2]) || 1;
      normals[i] /= l; normals[i + 1] /= l; normals[i + 2] /= l;
    }
    return normals;
  }

  // Every triangle primitive under the default scene, with its world matrix and material.
  function collectPrimitives(gltf) {
    const json = gltf.json, found = [];
    const visit = (nodeIndex, parent) => {
      const node = json.nodes[nodeIndex];
      let local = mat4Identity();
      if (node.matrix) local = new Float32Array(node.matrix);
      else if (node.translation || node.rotation || node.scale) local = mat4FromTRS(node.translation || [0, 0, 0], node.rotation || [0, 0, 0, 1], node.scale || [1, 1, 1]);
      const world = mat4Mul(parent, local);
      if (node.mesh !== undefined) {
        for (const prim of json.meshes[node.mesh].primitives) {
          if (prim.mode !== undefined && prim.mode !== 4) continue;
          if (prim.attributes.POSITION === undefined) continue;
          const positions = toFloat(gltf, prim.attributes.POSITION);
          let indices = prim.indices !== undefined ? readAccessor(gltf, prim.indices) : Uint32Array.from({ length: positions.length / 3 }, (_, i) => i);
          if (!(indices instanceof Uint32Array)) indices = Uint32Array.from(indices);
          const normals = prim.attributes.NORMAL !== undefined ? toFloat(gltf, prim.attributes.NORMAL) : smoothNormals(positions, indices);
          const uvs = prim.attributes.TEXCOORD_0 !== undefined ? toFloat(gltf, prim.attributes.TEXCOORD_0) : null;
          let colors = null;
          if (prim.attributes.COLOR_0 !== undefined) {
            const acc = json.accessors[prim.attributes.COLOR_0], raw = toFloat(gltf, prim.attributes.COLOR_0);
            const n = COMPONENTS[acc.type];
            colors = new Float32Array((raw.length / n) * 4);
            for (let i = 0, j = 0; i < raw.length; i += n, j += 4) { colors[j] = raw[i]; colors[j + 1] = raw[i + 1]; colors[j + 2] = raw[i + 2]; colors[j + 3] = n === 4 ? raw[i + 3] : 1; }
          }
          const material = prim.material !== undefined ? json.materials[prim.material] : {};
          found.push({ positions, normals, uvs, colors, indices, world, material });
        }
      }
      for (const child of node.children || []) visit(child, world);
    };
    const scene = json.scenes ? json.scenes[json.scene || 0] : { nodes: (json.nodes || []).map((_, i) => i) };
    for (const n of scene.nodes || []) visit(n, mat4Identity());
    if (!found.length) throw new Error("the GLB holds no triangle meshes");
    return found;
  }

  async function loadImage(gltf, textureIndex) {
    const texture = gltf.json.textures[textureIndex];
    const image = gltf.json.images[texture.source];
    if (image.bufferView === undefined) throw new Error("only images embedded in the GLB are supported");
    const bv = gltf.json.bufferViews[image.bufferView];
    const bytes = new Uint8Array(gltf.bin.buffer, gltf.bin.byteOffset + (bv.byteOffset || 0), bv.byteLength);
    return createImageBitmap(new Blob([bytes], { type: image.mimeType || "image/png" }), { imageOrientation: "none" });
  }

  // ----- drawing ----------------------------------------------------------------------------
  const VERTEX = `#version 300 es
    layout(location=0) in vec3 position; layout(location=1) in vec3 normal;
    layout(location=2) in vec2 uv; layout(location=3) in vec4 color;
    uniform mat4 model, viewProj; out vec3 vNormal; out vec2 vUv; out vec4 vColor; out vec3 vWorld;
    void main() {
      vec4 world = model * vec4(position, 1.0);
      vWorld = world.xyz; vNormal = mat3(model) * normal; vUv = uv; vColor = color;
      gl_Position = viewProj * world;
    }`;
  const FRAGMENT = `#version 300 es
    precision highp float;
    in vec3 vNormal; in vec2 vUv; in vec4 vColor; in vec3 vWorld;
    uniform sampler2D baseColorTexture; uniform bool hasTexture; uniform vec4 baseColorFactor; uniform vec3 eye;
    out vec4 outColor;
    void main() {
      vec4 albedo = baseColorFactor * vColor;
      if (hasTexture) albedo *= texture(baseColorTexture, vUv);
      vec3 n = normalize(vNormal), toEye = normalize(eye - vWorld);
      float light = 0.45 + 0.55 * abs(dot(n, toEye));  // headlight, two-sided: exports may be open
      outColor = vec4(albedo.rgb * light, 1.0);
    }`;

  function compile(gl, type, source) {
    const shader = gl.createShader(type);
    gl.shaderSource(shader, source);
    gl.compileShader(shader);
    if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error("shader: " + gl.getShaderInfoLog(shader));
    return shader;
  }

  class GLBViewer {
    constructor(canvas, buffer) {
      this.canvas = canvas;
      const gl = canvas.getContext("webgl2", { antialias: true, preserveDrawingBuffer: true });
      if (!gl) throw new Error("this browser has no WebGL2");
      this.gl = gl;
      const program = gl.createProgram();
      gl.attachShader(program, compile(gl, gl.VERTEX_SHADER, VERTEX));
      gl.attachShader(program, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT));
      gl.linkProgram(program);
      if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error("program: " + gl.getProgramInfoLog(program));
      this.program = program;
      this.uniforms = {};
      for (const name of ["model", "viewProj", "baseColorTexture", "hasTexture", "baseColorFactor", "eye"]) this.uniforms[name] = gl.getUniformLocation(program, name);
      this.gltf = parseGLB(buffer);
      this.primitives = collectPrimitives(this.gltf);
      this.frame();
      this.azimuth = 0.6; this.elevation = 0.35; this.zoom = 1.0;
      this.dirty = true;
      this.ready = Promise.all(this.primitives.map((p) => this.upload(p))).then(() => this.request());
      this.bindControls();
    }

    // Bounding sphere of the whole model in world space: the camera orbits its centre.
    frame() {
      const lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
      for (const p of this.primitives) for (let i = 0; i < p.positions.length; i += 3) {
        const w = transformPoint(p.world, [p.positions[i], p.positions[i + 1], p.positions[i + 2]]);
        for (let k = 0; k < 3; k++) { lo[k] = Math.min(lo[k], w[k]); hi[k] = Math.max(hi[k], w[k]); }
      }
      this.center = [0, 1, 2].map((k) => (lo[k] + hi[k]) / 2);
      this.radius = Math.max(1e-6, 0.5 * Math.hypot(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]));
    }

    async upload(p) {
      const gl = this.gl;
      p.vao = gl.createVertexArray();
      gl.bindVertexArray(p.vao);
      const attribute = (location, data, size) => {
        gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer());
        gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
        gl.enableVertexAttribArray(location);
        gl.vertexAttribPointer(location, size, gl.FLOAT, false, 0, 0);
      };
      attribute(0, p.positions, 3);
      attribute(1, p.normals, 3);
      if (p.uvs) attribute(2, p.uvs, 2); else gl.vertexAttrib2f(2, 0, 0);
      if (p.colors) attribute(3, p.colors, 4); else gl.vertexAttrib4f(3, 1, 1, 1, 1);
      gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, gl.createBuffer());
      gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, p.indices, gl.STATIC_DRAW);
      gl.bindVertexArray(null);
      const pbr = p.material.pbrMetallicRoughness || {};
      p.factor = pbr.baseColorFactor || [1, 1, 1, 1];
      p.texture = null;
      if (pbr.baseColorTexture && p.uvs) {
        const bitmap = await loadImage(this.gltf, pbr.baseColorTexture.index);
        p.texture = gl.createTexture();
        gl.bindTexture(gl.TEXTURE_2D, p.texture);
        gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, gl.RGBA, gl.UNSIGNED_BYTE, bitmap);
        gl.generateMipmap(gl.TEXTURE_2D);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR_MIPMAP_LINEAR);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
      }
    }

    bindControls() {
      const c = this.canvas, pointers = new Map();
      let pinch = null;
      c.addEventListener("pointerdown", (e) => { pointers.set(e.pointerId, [e.clientX, e.clientY]); c.setPointerCapture(e.pointerId); });
      c.addEventListener("pointermove", (e) => {
        if (!pointers.has(e.pointerId)) return;
        const [x, y] = pointers.get(e.pointerId);
        pointers.set(e.pointerId, [e.clientX, e.clientY]);
        if (pointers.size === 1) {
          this.azimuth -= (e.clientX - x) * 0.01;
          this.elevation = Math.max(-1.5, Math.min(1.5, this.elevation + (e.clientY - y) * 0.01));
        } else if (pointers.size === 2) {
          const [a, b] = [...pointers.values()], d = Math.hypot(a[0] - b[0], a[1] - b[1]);
          if (pinch) this.setZoom(this.zoom * pinch / d);
          pinch = d;
        }
        this.request();
      });
      const release = (e) => { pointers.delete(e.pointerId); pinch = null; };
      c.addEventListener("pointerup", release);
      c.addEventListener("pointercancel", release);
      c.addEventListener("wheel", (e) => { e.preventDefault(); this.setZoom(this.zoom * Math.exp(e.deltaY * 0.001)); }, { passive: false });
      c.addEventListener("dblclick", () => { this.azimuth = 0.6; this.elevation = 0.35; this.setZoom(1); });
    }

    setZoom(z) { this.zoom = Math.max(0.2, Math.min(5, z)); this.request(); }

    request() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }

    draw() {
      const gl = this.gl, c = this.canvas, dpr = window.devicePixelRatio || 1;
      const w = Math.max(1, Math.round(c.clientWidth * dpr)), h = Math.max(1, Math.round(c.clientHeight * dpr));
      if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
      gl.viewport(0, 0, w, h);
      gl.clearColor(0.93, 0.94, 0.96, 1);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      gl.enable(gl.DEPTH_TEST);
      const fovy = 0.7, distance = (this.radius / Math.sin(fovy / 2)) * 1.1 * this.zoom;
      const ce = Math.cos(this.elevation);
      const eye = [this.center[0] + distance * ce * Math.sin(this.azimuth), this.center[1] + distance * Math.sin(this.elevation), this.center[2] + distance * ce * Math.cos(this.azimuth)];
      const viewProj = mat4Mul(perspective(fovy, w / h, distance * 0.01, distance + this.radius * 4), lookAt(eye, this.center, [0, 1, 0]));
      gl.useProgram(this.program);
      gl.uniformMatrix4fv(this.uniforms.viewProj, false, viewProj);
      gl.uniform3fv(this.uniforms.eye, eye);
      gl.uniform1i(this.uniforms.baseColorTexture, 0);
      for (const p of this.primitives) {
        if (!p.vao) continue;
        gl.uniformMatrix4fv(this.uniforms.model, false, p.world);
        gl.uniform4fv(this.uniforms.baseColorFactor, p.factor);
        gl.uniform1i(this.uniforms.hasTexture, p.texture ? 1 : 0);
        gl.activeTexture(gl.TEXTURE0);
        gl.bindTexture(gl.TEXTURE_2D, p.texture);
        gl.bindVertexArray(p.vao);
        gl.drawElements(gl.TRIANGLES, p.indices.length, gl.UNSIGNED_INT, 0);
      }
      gl.bindVertexArray(null);
      c.dataset.state = "ready";
    }
  }

  function decodeBase64(text) {
    const binary = atob(text.replace(/\s+/g, ""));
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes.buffer;
  }

  function start(canvas) {
    canvas.dataset.state = "loading";
    const source = document.getElementById(canvas.dataset.glb);
    try {
      if (!source) throw new Error("no embedded GLB with id " + canvas.dataset.glb);
      const viewer = new GLBViewer(canvas, decodeBase64(source.textContent));
      canvas.viewer = viewer;
      viewer.ready.catch((err) => fail(canvas, err));
    } catch (err) {
      fail(canvas, err);
    }
  }

  function fail(canvas, err) {
    canvas.dataset.state = "error";
    const note = document.createElement("div");
    note.className = "viewer-error";
    note.textContent = "3D viewer: " + err.message;
    canvas.replaceWith(note);
    console.error("distill3d GLB viewer:", err);
  }

  window.distill3dViewer = { parseGLB, collectPrimitives, GLBViewer };
  document.addEventListener("DOMContentLoaded", () => document.querySelectorAll("canvas.glb-viewer").forEach(start));
})();
