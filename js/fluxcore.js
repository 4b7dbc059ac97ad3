// FluxCore's front-end extension (ComfyUI loads every .js file in the pack's WEB_DIRECTORY, ./js).
// It only gives FluxCore's nodes one colour, so they stand out among core nodes on the canvas.
import { app } from "../../scripts/app.js";

const TITLE_COLOR = "#223b5c";
const BODY_COLOR = "#2e4a70";

app.registerExtension({
  name: "FluxCore.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FluxCore")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // Only a default: a colour the user picks (or a saved workflow sets) is applied after this.
      this.color ??= TITLE_COLOR;
      this.bgcolor ??= BODY_COLOR;
      return result;
    };
  },
});
