// Gives the pack's nodes one colour so a FlashPortrait graph reads at a glance among other packs' nodes.
import { app } from "../../scripts/app.js";

const NODE_COLOR = "#2f3e5c";
const NODE_BGCOLOR = "#1e273a";

app.registerExtension({
  name: "FlashPortrait.NodeColours",
  nodeCreated(node) {
    if (node.comfyClass?.startsWith("FlashPortrait")) {
      node.color = NODE_COLOR;
      node.bgcolor = NODE_BGCOLOR;
    }
  },
});
