"""An interactive latent explorer for the run report: the decoder's weights and a plain-JavaScript forward pass
embedded in the page, so that moving the pointer over the latent plane decodes E[x|z] live, offline.

What qualifies: an MLP decoder (``elbolab.networks.mlp``: Linear layers with relu, tanh, elu, softplus or gelu
between them) fed by z alone (the first layer has ``latent_dim`` inputs), the base class's ``decode_mean`` and a
likelihood head whose mean is a closed form of the decoder output:

* ``bernoulli``             E[x|z] = sigmoid(f(z))
* ``continuous-bernoulli``  E[x|z] = lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)), lambda = sigmoid(f(z)),
                            with torch's clamping of lambda and its Taylor expansion near 1/2 (evaluated in float64,
                            as ``ContinuousBernoulliHead.mean``)
* ``gaussian``, ``gaussian-learned``  E[x|z] = f(z);  ``gaussian-decoder``  the first D outputs of f(z).

The weights go into the page as base64 little-endian float32 arrays; the JavaScript accumulates in float64, so it
agrees with PyTorch's float32 forward pass to float32 rounding (tests/test_explorer.py runs it with node).
A decoder above ``MAX_DECODER_PARAMETERS`` (8 MB of weights, 11 MB of base64) is refused: the report keeps the
static figures and says why.

The page reads ``#explorer-test=X,Y`` in its address on load (sets the plane's two dimensions to X and Y) and
writes a checksum of the decoded image's pixels into ``data-checksum`` of ``#explorer-image``: the hooks the
browser test uses to check that the picture follows the pointer.
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np
import torch
from torch import nn

from elbolab import likelihoods as lk
from elbolab.errors import ElbolabError
from elbolab.models.base import LatentVariableModel

__all__ = ["MAX_DECODER_PARAMETERS", "ExplorerUnavailable", "decoder_spec", "explorer_html", "EXPLORER_CSS",
           "CORE_JS"]

MAX_DECODER_PARAMETERS = 2_000_000
MAX_POINTS = 1000  # encoded examples drawn on the plane (float32 [N, d] in the page)


class ExplorerUnavailable(ElbolabError):
    """The run's model cannot be explored in the page; the message says why (shown as a note)."""


def _b64(t: torch.Tensor | np.ndarray) -> str:
    array = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _activation(module: nn.Module) -> dict:
    if isinstance(module, nn.ReLU):
        return {"act": "relu"}
    if isinstance(module, nn.Tanh):
        return {"act": "tanh"}
    if isinstance(module, nn.ELU):
        return {"act": "elu", "alpha": float(module.alpha)}
    if isinstance(module, nn.Softplus):
        return {"act": "softplus", "beta": float(module.beta), "threshold": float(module.threshold)}
    if isinstance(module, nn.GELU):
        return {"act": "gelu_tanh" if module.approximate == "tanh" else "gelu"}
    raise ExplorerUnavailable(f"the decoder has a {type(module).__name__} layer, which the page's forward pass "
                              "does not implement (it knows Linear, ReLU, Tanh, ELU, Softplus, GELU)")


def _head(model) -> tuple[str, int]:
    """(the JavaScript name of the output head's mean, how many decoder outputs it reads)."""
    heads = {lk.BernoulliHead: "sigmoid", lk.ContinuousBernoulliHead: "continuous_bernoulli",
             lk.GaussianFixedHead: "identity", lk.GaussianPerPixelHead: "identity",
             lk.GaussianDecoderVarianceHead: "identity"}
    head = model.likelihood_head
    if type(head) not in heads:
        raise ExplorerUnavailable(f"the likelihood head {type(head).__name__} has no closed-form mean in the page")
    return heads[type(head)], model.config.input_dim


def decoder_spec(model, max_parameters: int | None = None) -> dict:
    """The decoder as a JSON-able dict: layers (base64 float32 weights [out, in] row-major, biases, activation)
    and the head. Raises ExplorerUnavailable when the model does not qualify (see the module docstring)."""
    max_parameters = MAX_DECODER_PARAMETERS if max_parameters is None else max_parameters
    config = getattr(model, "config", None)
    if not isinstance(model, LatentVariableModel) or config is None:
        raise ExplorerUnavailable("the model is not a LatentVariableModel with an encoder and a decoder")
    if type(model).decode_mean is not LatentVariableModel.decode_mean:
        raise ExplorerUnavailable(f"the {type(model).__name__} model computes E[x|z] its own way")
    if getattr(config, "architecture", "mlp") != "mlp" or not isinstance(model.decoder, nn.Sequential):
        if config.image_shape is None:
            raise ExplorerUnavailable("the data are not images (e.g. a bag of words), so there is no picture for "
                                      "the decoder to draw")
        raise ExplorerUnavailable("the decoder is not an MLP (e.g. --arch conv); the page only runs MLP decoders")
    if config.image_shape is None:
        raise ExplorerUnavailable("the data are not images; there is no picture to decode into")
    head, n_out = _head(model)
    modules = list(model.decoder)
    layers, i = [], 0
    while i < len(modules):
        linear = modules[i]
        if not isinstance(linear, nn.Linear) or linear.bias is None:
            raise ExplorerUnavailable(f"the decoder has {type(linear).__name__} where the page expects a Linear "
                                      "layer with a bias")
        layer = {"act": None}
        if i + 1 < len(modules) and not isinstance(modules[i + 1], nn.Linear):
            layer = _activation(modules[i + 1])
            i += 1
        layers.append((linear, layer))
        i += 1
    if not layers or layers[0][0].in_features != config.latent_dim:
        raise ExplorerUnavailable("the decoder reads more than z (e.g. a label it is conditioned on)")
    weights = [linear.weight for linear, _ in layers]
    biases = [linear.bias for linear, _ in layers]
    if layers[-1][0].out_features < n_out:
        raise ExplorerUnavailable(f"the decoder has {layers[-1][0].out_features} outputs, expected >= {n_out}")
    weights[-1], biases[-1] = weights[-1][:n_out], biases[-1][:n_out]  # the mean's rows (gaussian-decoder: loc)
    n_params = sum(w.numel() + b.numel() for w, b in zip(weights, biases))
    if n_params > max_parameters:
        raise ExplorerUnavailable(f"the decoder has {n_params:,} parameters, more than the {max_parameters:,} the page "
                                  f"embeds ({4 * max_parameters / 1e6:.0f} MB of weights); see the static figures")
    spec_layers = []
    for w, b, (_, layer) in zip(weights, biases, layers):
        spec_layers.append({"n_in": int(w.shape[1]), "n_out": int(w.shape[0]), "w": _b64(w), "b": _b64(b), **layer})
    return {"latent_dim": int(config.latent_dim), "image_shape": [int(s) for s in config.image_shape],
            "head": head, "layers": spec_layers, "n_params": int(n_params)}


def _labels(y, n: int) -> list[int] | None:
    """Integer class labels (at most 20 classes) to colour the points by, else None."""
    if y is None:
        return None
    values = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)[:n]
    if values.size != n or not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        return None
    if len(np.unique(values)) > 20:
        return None
    return [int(v) for v in values]


@torch.no_grad()
def explorer_html(model, data=None, *, max_points: int = MAX_POINTS,
                  max_parameters: int | None = None) -> str:
    """The explorer's HTML (a plane over the encoded examples of ``data``, an image canvas, one slider per latent
    dimension, the weights and the script). ``data``: a TensorData split (the test set); without it the plane shows
    the prior's +-3 box only. Raises ExplorerUnavailable when the model does not qualify."""
    spec = decoder_spec(model, max_parameters)
    d = spec["latent_dim"]
    points = np.zeros((0, d), dtype=np.float32)
    labels = None
    display = (0.0, 1.0)
    if data is not None and len(data) > 0:
        n = min(len(data), max_points)
        batch = data.batch(torch.arange(n), torch.Generator().manual_seed(0))
        means = model.latent_means(batch)
        z = means["z"] if "z" in means else next(iter(means.values()))  # [N, d]
        if z.shape[-1] == d:
            points = z.reshape(-1, d).float().cpu().numpy()
            labels = _labels(batch.y, len(points))
        x = batch.x.float()
        if spec["head"] == "identity" and torch.isfinite(x).all():
            display = (float(x.min()), float(x.max()))
    if len(points):
        spread = points.std(0) if len(points) > 1 else np.zeros(d)
        order = [int(i) for i in np.argsort(-spread, kind="stable")]
        anchor = [float(v) for v in points[0]]
    else:
        order, anchor = list(range(d)), [0.0] * d
    low = np.minimum(points.min(0) if len(points) else -3.0, -3.0)
    high = np.maximum(points.max(0) if len(points) else 3.0, 3.0)
    pad = 0.05 * (high - low)
    spec.update(points=_b64(points), n_points=len(points), labels=labels, anchor=anchor,
                low=[float(v) for v in np.broadcast_to(low - pad, (d,))],
                high=[float(v) for v in np.broadcast_to(high + pad, (d,))],
                dims=sorted(order[:2]) if d >= 2 else [0, -1], display=list(display))  # lower index across
    payload = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
    n_params = f"{spec['n_params']:,}"
    about = ("Move the pointer over the plane (or drag on a touch screen): the picture is the decoder's mean "
             "E[x|z] at that point, computed in the page from the embedded weights "
             f"({n_params} parameters). The dots are encoded test examples (the means of q(z|x)); click one to "
             "move every dimension to its code. The sliders move each dimension of z.")
    if d > 2:
        about += (" With more than two dimensions the plane shows the two chosen below (by default the two "
                  "whose codes spread most); the other dimensions stay at the sliders' values, starting from the "
                  "first test example's code.")
    options = "".join(f'<option value="{i}">z{i}</option>' for i in range(d))  # 0-based, as the figures
    pickers = ""
    if d > 2:
        pickers = (f'<div class="ex-pick"><label>horizontal <select id="explorer-dx">{options}</select></label>'
                   f'<label>vertical <select id="explorer-dy">{options}</select></label></div>')
    return (
        f'<div class="explorer" id="explorer"><p class="ex-about">{html.escape(about)}</p>{pickers}'
        '<div class="ex-row"><div class="ex-plane"><canvas id="explorer-plane" width="360" height="360" '
        'aria-label="latent plane"></canvas><div class="ex-legend" id="explorer-legend"></div></div>'
        '<div class="ex-side"><canvas id="explorer-image" aria-label="decoded image"></canvas>'
        '<div class="ex-z" id="explorer-z"></div><div class="ex-sliders" id="explorer-sliders"></div></div></div>'
        f'<script type="application/json" id="explorer-data">{payload}</script>'
        f'<script id="explorer-core">{CORE_JS}</script><script>{_UI_JS}</script></div>'
    )


EXPLORER_CSS = """
.explorer .ex-about { font-size:.9rem; color:var(--muted); margin:0 0 8px; }
.explorer .ex-row { display:flex; flex-wrap:wrap; gap:18px; align-items:flex-start; }
.explorer .ex-plane { flex:0 1 360px; min-width:0; }
.explorer canvas#explorer-plane { width:100%; max-width:360px; aspect-ratio:1; display:block; background:#fff;
  border:1px solid var(--line); border-radius:6px; cursor:crosshair; touch-action:none; }
.explorer canvas#explorer-image { width:200px; height:200px; image-rendering:pixelated; background:#000;
  border:1px solid var(--line); border-radius:6px; display:block; }
.explorer .ex-side { flex:1 1 220px; min-width:0; }
.explorer .ex-z { font:13px ui-monospace,Menlo,Consolas,monospace; margin:6px 0; word-break:break-all; }
.explorer .ex-sliders { display:grid; grid-template-columns:repeat(auto-fill,minmax(180px,1fr)); gap:2px 14px;
  max-height:260px; overflow-y:auto; }
.explorer .ex-sliders label { font-size:.8rem; color:var(--muted); display:flex; align-items:center; gap:6px; }
.explorer .ex-sliders input { flex:1; min-width:0; }
.explorer .ex-legend { font-size:.8rem; color:var(--muted); margin-top:4px; display:flex; flex-wrap:wrap;
  gap:2px 10px; }
.explorer .ex-legend i { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:4px; }
.explorer .ex-pick { font-size:.85rem; margin-bottom:6px; display:flex; gap:14px; flex-wrap:wrap; }
"""

# The forward pass, free of the DOM (node runs it in the tests): elbolabDecoder(spec).decode(z) -> Float64Array.
CORE_JS = r"""
function elbolabF32(b64){var s=atob(b64),n=s.length,u=new Uint8Array(n);for(var i=0;i<n;i++)u[i]=s.charCodeAt(i);
return new Float32Array(u.buffer);}
function elbolabDecoder(spec){
 var layers=spec.layers.map(function(l){return{w:elbolabF32(l.w),b:elbolabF32(l.b),nin:l.n_in,nout:l.n_out,
  act:l.act,alpha:l.alpha,beta:l.beta,threshold:l.threshold};});
 function erf(x){/* erfc by a Chebyshev fit, fractional error < 1.2e-7 */
  var z=Math.abs(x),t=1/(1+0.5*z),r=t*Math.exp(-z*z-1.26551223+t*(1.00002368+t*(0.37409196+t*(0.09678418+
  t*(-0.18628806+t*(0.27886807+t*(-1.13520398+t*(1.48851587+t*(-0.82215223+t*0.17087277)))))))));
  return x>=0?1-r:r-1;}
 function act(l,x){switch(l.act){
  case "relu":return x>0?x:0;
  case "tanh":return Math.tanh(x);
  case "elu":return x>0?x:l.alpha*Math.expm1(x);
  case "softplus":return x*l.beta>l.threshold?x:Math.log1p(Math.exp(l.beta*x))/l.beta;
  case "gelu":return 0.5*x*(1+erf(x/Math.SQRT2));
  case "gelu_tanh":return 0.5*x*(1+Math.tanh(Math.sqrt(2/Math.PI)*(x+0.044715*x*x*x)));
  default:return x;}}
 function sigmoid(x){return 1/(1+Math.exp(-x));}
 function cbMean(x){var eps=2.220446049250313e-16,p=Math.min(Math.max(sigmoid(x),eps),1-eps);
  if(p<=0.499||p>0.501)return p/(2*p-1)+1/(Math.log1p(-p)-Math.log(p));
  var d=p-0.5;return 0.5+(1/3+16/45*d*d)*d;}
 function decode(z){var h=Float64Array.from(z);
  for(var k=0;k<layers.length;k++){var L=layers[k],o=new Float64Array(L.nout);
   for(var j=0;j<L.nout;j++){var s=L.b[j],row=j*L.nin;for(var i=0;i<L.nin;i++)s+=L.w[row+i]*h[i];
    o[j]=L.act?act(L,s):s;}h=o;}
  if(spec.head==="sigmoid")for(var m=0;m<h.length;m++)h[m]=sigmoid(h[m]);
  else if(spec.head==="continuous_bernoulli")for(var q=0;q<h.length;q++)h[q]=cbMean(h[q]);
  return h;}
 return {decode:decode,spec:spec};
}
"""

_UI_JS = r"""
(function(){
var spec=JSON.parse(document.getElementById("explorer-data").textContent),D=elbolabDecoder(spec),d=spec.latent_dim;
var plane=document.getElementById("explorer-plane"),img=document.getElementById("explorer-image");
var sh=spec.image_shape,C=sh[0],H=sh[1],W=sh[2];img.width=W;img.height=H;
var pts=spec.n_points?elbolabF32(spec.points):new Float32Array(0),lab=spec.labels;
var z=spec.anchor.slice(),dx=spec.dims[0],dy=spec.dims[1],lo=spec.low,hi=spec.high;
var pal=["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#7f7f7f","#bcbd22","#17becf",
"#393b79","#637939","#8c6d31","#843c39","#7b4173","#3182bd","#e6550d","#31a354","#756bb1","#636363"];
var classes=lab?Array.from(new Set(lab)).sort(function(a,b){return a-b;}):[];
function col(i){return lab?pal[classes.indexOf(lab[i])%pal.length]:"#2f6fb0";}
var sliders=[],box=document.getElementById("explorer-sliders");
for(var k=0;k<d;k++){var l=document.createElement("label"),s=document.createElement("input");
 s.type="range";s.min=lo[k];s.max=hi[k];s.step=(hi[k]-lo[k])/400;s.value=z[k];s.dataset.k=k;
 l.appendChild(document.createTextNode("z"+k));l.appendChild(s);box.appendChild(l);sliders.push(s);
 s.addEventListener("input",function(e){z[+e.target.dataset.k]=+e.target.value;draw();});}
var leg=document.getElementById("explorer-legend");
if(lab){classes.forEach(function(c,j){var e=document.createElement("span");e.innerHTML='<i style="background:'+
 pal[j%pal.length]+'"></i>'+c;leg.appendChild(e);});}
var S=360,pad=28,R=Math.max(1,Math.min(3,window.devicePixelRatio||1));plane.width=plane.height=Math.round(S*R);
function px(v,k){return pad+(v-lo[k])/(hi[k]-lo[k])*(S-2*pad);}
function py(v,k){return k<0?S/2:S-pad-(v-lo[k])/(hi[k]-lo[k])*(S-2*pad);}
function jit(i){return ((i*2654435761)%997)/997-0.5;}
function drawPlane(){var g=plane.getContext("2d");g.setTransform(R,0,0,R,0,0);g.clearRect(0,0,S,S);
 g.strokeStyle="#c9d1da";g.lineWidth=1;
 g.strokeRect(pad,pad,S-2*pad,S-2*pad);g.globalAlpha=0.7;
 for(var i=0;i<spec.n_points;i++){var x=px(pts[i*d+dx],dx),y=dy<0?S/2+jit(i)*(S-2*pad)*0.8:py(pts[i*d+dy],dy);
  g.fillStyle=col(i);g.beginPath();g.arc(x,y,2.2,0,6.2832);g.fill();}
 g.globalAlpha=1;var cx=px(z[dx],dx),cy=dy<0?S/2:py(z[dy],dy);g.strokeStyle="#111";g.lineWidth=1.5;
 g.beginPath();g.moveTo(cx-9,cy);g.lineTo(cx+9,cy);g.moveTo(cx,cy-9);g.lineTo(cx,cy+9);g.stroke();
 g.fillStyle="#555";g.font="12px sans-serif";g.textAlign="center";g.fillText("z"+dx,S/2,S-8);
 g.fillText(lo[dx].toFixed(1),pad,S-8);g.fillText(hi[dx].toFixed(1),S-pad,S-8);
 if(dy>=0){g.save();g.translate(12,S/2);g.rotate(-Math.PI/2);g.fillText("z"+dy,0,0);g.restore();
  g.textAlign="left";g.fillText(hi[dy].toFixed(1),2,pad+4);g.fillText(lo[dy].toFixed(1),2,S-pad);}}
function drawImage(){var m=D.decode(z),g=img.getContext("2d"),im=g.createImageData(W,H),a=spec.display[0],
 b=spec.display[1],r=b>a?255/(b-a):0,hash=2166136261;
 for(var p=0;p<H*W;p++){for(var c=0;c<3;c++){var v=m[(C===3?c:0)*H*W+p];
  im.data[4*p+c]=Math.max(0,Math.min(255,Math.round((v-a)*r)));}im.data[4*p+3]=255;}
 g.putImageData(im,0,0);var back=g.getImageData(0,0,W,H).data;
 for(var q=0;q<back.length;q++){hash=Math.imul(hash^back[q],16777619)>>>0;}img.dataset.checksum=String(hash);}
function draw(){drawPlane();drawImage();for(var k=0;k<d;k++)sliders[k].value=z[k];
 document.getElementById("explorer-z").textContent="z = ("+z.map(function(v){return v.toFixed(2);}).join(", ")+")";}
function at(e){var r=plane.getBoundingClientRect(),x=(e.clientX-r.left)*S/r.width,y=(e.clientY-r.top)*S/r.height;
 return [x,y];}
function setFrom(e){var q=at(e);z[dx]=lo[dx]+(q[0]-pad)/(S-2*pad)*(hi[dx]-lo[dx]);
 if(dy>=0)z[dy]=lo[dy]+(S-pad-q[1])/(S-2*pad)*(hi[dy]-lo[dy]);draw();}
plane.addEventListener("pointermove",function(e){if(e.pointerType==="mouse"||e.buttons)setFrom(e);});
plane.addEventListener("pointerdown",function(e){setFrom(e);});
plane.addEventListener("click",function(e){var q=at(e),best=-1,bd=64;
 for(var i=0;i<spec.n_points;i++){var ex=px(pts[i*d+dx],dx)-q[0],ey=dy<0?0:py(pts[i*d+dy],dy)-q[1];
  if(ex*ex+ey*ey<bd){bd=ex*ex+ey*ey;best=i;}}
 if(best>=0){for(var k=0;k<d;k++)z[k]=pts[best*d+k];draw();}});
["dx","dy"].forEach(function(n){var s=document.getElementById("explorer-"+n);if(!s)return;
 s.value=n==="dx"?dx:dy;s.addEventListener("change",function(){var v=+s.value;if(n==="dx")dx=v;else dy=v;draw();});});
var t=/explorer-test=([-+0-9.eE]+),([-+0-9.eE]+)/.exec(location.hash);
if(t){z[dx]=+t[1];if(dy>=0)z[dy]=+t[2];}
draw();
})();
"""
