// FluxCore trainer node (FluxCoreTrainLoRA): a live loss chart and the latest validation image in the node.
// The node's Python side sends "fluxcore.train" events (PromptServer.send_sync) with {node, event, ...}:
//   start {total_steps, start_step}, step {step, total_steps, loss, lr, eta_s, images_per_s},
//   validation {step, images: [{filename, subfolder, type}]}, checkpoint/done/stopped {step, path}, error {message}.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "FluxCoreTrainLoRA";
const CHART_HEIGHT = 120;
const MAX_POINTS = 2000;

function findNode(id) {
  if (id === undefined || id === null) return null;
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id) ?? null;
}

function formatEta(seconds) {
  if (!Number.isFinite(seconds)) return "";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

// A canvas widget: the loss per step (light) and its running mean (bright), with step/loss/ETA text.
function lossChartWidget(node) {
  return {
    name: "fluxcore_loss_chart",
    type: "fluxcore_loss_chart",
    value: null,
    serialize: false,
    computeSize(width) {
      return [width, CHART_HEIGHT];
    },
    draw(ctx, node, width, y) {
      const t = node.fluxcoreTrain;
      const x0 = 10, w = width - 20, h = CHART_HEIGHT - 24, top = y + 18;
      ctx.save();
      ctx.fillStyle = "#1b1f27";
      ctx.fillRect(x0, top, w, h);
      ctx.font = "11px sans-serif";
      ctx.fillStyle = "#cdd6e4";
      const label = t?.status ?? "loss: waiting for the first step";
      ctx.fillText(label, x0, y + 12);
      const losses = t?.losses ?? [];
      if (losses.length > 1) {
        const min = Math.min(...losses), max = Math.max(...losses);
        const span = max - min || 1;
        const px = (i) => x0 + (i / (losses.length - 1)) * w;
        const py = (v) => top + h - ((v - min) / span) * (h - 4) - 2;
        ctx.strokeStyle = "rgba(120,160,220,0.45)";
        ctx.beginPath();
        losses.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
        ctx.stroke();
        const k = Math.max(1, Math.round(losses.length / 20));
        ctx.strokeStyle = "#f0b429";
        ctx.lineWidth = 2;
        ctx.beginPath();
        let sum = 0;
        losses.forEach((v, i) => {
          sum += v;
          if (i >= k) sum -= losses[i - k];
          const mean = sum / Math.min(i + 1, k);
          i ? ctx.lineTo(px(i), py(mean)) : ctx.moveTo(px(i), py(mean));
        });
        ctx.stroke();
        ctx.fillStyle = "#8892a6";
        ctx.fillText(max.toPrecision(3), x0 + 2, top + 11);
        ctx.fillText(min.toPrecision(3), x0 + 2, top + h - 3);
      }
      ctx.restore();
    },
  };
}

function onTrainEvent({ detail }) {
  const node = findNode(detail?.node);
  if (!node || node.type !== NODE) return;
  const t = (node.fluxcoreTrain ??= { losses: [], status: null });
  switch (detail.event) {
    case "start":
      t.losses = [];
      t.status = `starting at step ${detail.start_step} of ${detail.total_steps}`;
      break;
    case "step":
      t.losses.push(detail.loss);
      if (t.losses.length > MAX_POINTS) t.losses.splice(0, t.losses.length - MAX_POINTS);
      t.status = `step ${detail.step}/${detail.total_steps}  loss ${detail.loss.toFixed(4)}  ` +
        `lr ${detail.lr.toExponential(1)}  ${detail.images_per_s.toFixed(2)} img/s  ETA ${formatEta(detail.eta_s)}`;
      break;
    case "validation": {
      const last = detail.images?.[detail.images.length - 1];
      if (last) {
        const img = new Image();
        img.onload = () => app.graph.setDirtyCanvas(true, true);
        img.src = api.apiURL(`/view?filename=${encodeURIComponent(last.filename)}&subfolder=` +
          `${encodeURIComponent(last.subfolder)}&type=${last.type}&rand=${Math.random()}`);
        node.imgs = [img];
        node.imageIndex = 0;
      }
      break;
    }
    case "stopped":
      t.status = `stopped at step ${detail.step}: checkpoint saved, 'resume' continues it`;
      break;
    case "done":
      t.status = `done at step ${detail.step}`;
      break;
    case "error":
      t.status = `error: ${detail.message}`;
      break;
  }
  app.graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "FluxCore.train",
  async setup() {
    api.addEventListener("fluxcore.train", onTrainEvent);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.fluxcoreTrain = { losses: [], status: null };
      this.addCustomWidget(lossChartWidget(this));
      return result;
    };
  },
});
