"""`edgediff serve`: a real server process on a free local port, the built-in model, and the requests
AUTOMATIC1111's clients send (the bodies the `webuiapi` package builds, written out here).

One server answers most tests (started once, about 5 s); the auth test starts its own. Generations are
64x64 with few steps, except where a test needs one long enough to watch, interrupt or walk away from.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_process import ServeProcess, serve_command

PROMPT = "a red circle on a blue background"
SMALL = {"width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def folders(builtin_model, tmp_path_factory):
    """--models-dir with a second model (the built-in export again, under another name) and --lora-dir."""
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    models.mkdir()
    (models / "other").symlink_to(Path(builtin_model).resolve(), target_is_directory=True)
    (models / "not-a-model").mkdir()  # a folder with no export in it is not listed
    loras = root / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"listed by name; never read by a listing")
    return root, models, loras


@pytest.fixture(scope="module")
def server(builtin_model, folders):
    root, models, loras = folders
    s = ServeProcess(root, "--model", str(builtin_model), "--models-dir", str(models), "--lora-dir", str(loras))
    try:
        s.wait()
        yield s
    finally:
        s.stop()


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def sd_parsers_read(image_b64: str, tmp_path: Path):
    from sd_parsers import ParserManager

    path = tmp_path / "read.png"
    path.write_bytes(base64.b64decode(image_b64))
    return ParserManager().parse(str(path))


def webuiapi_txt2img(**fields) -> dict:
    """The body webuiapi's WebUIApi.txt2img() sends with its defaults (webuiapi/webuiapi.py)."""
    body = {"enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
            "hr_resize_y": 0, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
            "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7.0, "width": 512,
            "height": 512, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
            "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
            "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
            "sampler_name": "Euler a", "sampler_index": "Euler a", "script_name": None, "script_args": [],
            "send_images": True, "save_images": False, "alwayson_scripts": {}}
    return {**body, **fields}


def webuiapi_img2img(images: list[str], mask: str | None, **fields) -> dict:
    """The body of webuiapi's WebUIApi.img2img(): init images as data URLs, its inpainting defaults."""
    body = webuiapi_txt2img(**fields)
    for key in ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                "firstphase_width", "firstphase_height"):
        body.pop(key)
    body.update({"init_images": [f"data:image/png;base64,{i}" for i in images], "resize_mode": 0,
                 "denoising_strength": 0.75, "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True,
                 "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": 1,
                 "image_cfg_scale": 1.5, "include_init_images": False})
    if mask is not None:
        body["mask"] = f"data:image/png;base64,{mask}"
    body.update(fields)
    return body


def generate_in_background(client: httpx.Client, body: dict) -> tuple[threading.Thread, dict]:
    out = {}

    def run():
        out["response"] = client.post("/sdapi/v1/txt2img", json=body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def wait_for(client: httpx.Client, test, what: str, seconds: float = 120) -> dict:
    """Poll /progress until `test` holds: a bound against hanging, not a measurement."""
    deadline = time.monotonic() + seconds
    while True:
        p = client.get("/sdapi/v1/progress", params={"skip_current_image": "false"}).json()
        if test(p):
            return p
        assert time.monotonic() < deadline, f"never saw {what}; last progress {p}"
        time.sleep(0.05)


# -- what A1111's clients send ------------------------------------------------------------------------


def test_txt2img_as_webuiapi_sends_it(server, tmp_path):
    r = server.client.post("/sdapi/v1/txt2img", json=webuiapi_txt2img(
        prompt=PROMPT, negative_prompt="blurry", seed=7, batch_size=2, n_iter=2, **SMALL))
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])  # a JSON string, as A1111's
    assert info["all_seeds"] == [7, 8, 9, 10]  # A1111's seeds: batch after batch, one per image
    assert info["warnings"] == []  # webuiapi's defaults ask for nothing edgediff ignores
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "builtin"
    assert answer["parameters"]["prompt"] == PROMPT  # the request echoed back
    assert len(answer["images"]) == 4
    pictures = [decoded(i) for i in answer["images"]]
    assert all(p.size == (64, 64) for p in pictures)
    assert pictures[0].tobytes() != pictures[1].tobytes()  # different seeds, different pictures
    read = sd_parsers_read(answer["images"][2], tmp_path)
    assert [p.value for p in read.prompts] == [PROMPT]
    assert [p.value for p in read.negative_prompts] == ["blurry"]
    sampler, = read.samplers
    assert sampler.parameters["seed"] == "9"  # the first image of the second batch
    assert sampler.parameters["steps"] == "4" and sampler.name == "Euler a" and sampler.model.name == "builtin"
    # the same seed gives the same picture: the server adds nothing random
    again = server.client.post("/sdapi/v1/txt2img", json=webuiapi_txt2img(
        prompt=PROMPT, negative_prompt="blurry", seed=9, **SMALL)).json()
    assert decoded(again["images"][0]).tobytes() == pictures[2].tobytes()


def test_fields_edgediff_ignores_are_named_in_info(server):
    body = webuiapi_txt2img(prompt=PROMPT, seed=1, enable_hr=True, restore_faces=True,
                            alwayson_scripts={"ControlNet": {"args": []}}, **SMALL)
    info = json.loads(server.client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    warning, = info["warnings"]
    for name in ("enable_hr", "restore_faces", "alwayson_scripts", "hr_upscaler"):
        assert name in warning


def test_img2img_with_a_mask_repaints_inside_it_and_keeps_the_rest(server, tmp_path):
    # left half red, right half blue; the mask (white: repaint) covers the right half
    init = Image.new("RGB", (64, 64), (220, 30, 30))
    init.paste((30, 30, 220), (32, 0, 64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    r = server.client.post("/sdapi/v1/img2img", json=webuiapi_img2img(
        [png_b64(init)], png_b64(mask), prompt="a yellow square", seed=3, **SMALL))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["parameters"]["init_images"] is None  # A1111 leaves them out unless include_init_images
    out = decoded(answer["images"][0]).convert("RGB")
    assert out.size == (64, 64)
    # outside the mask (beyond the reach of its blur, sigma 4) the original is pasted back, as A1111 does
    assert out.crop((0, 0, 16, 64)).tobytes() == init.crop((0, 0, 16, 64)).tobytes()
    assert out.crop((40, 0, 64, 64)).tobytes() != init.crop((40, 0, 64, 64)).tobytes()
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.75
    assert "inpaint_full_res" in info["warnings"][0]  # "only masked" is not done: said, not hidden
    read = sd_parsers_read(answer["images"][0], tmp_path)
    assert [p.value for p in read.prompts] == ["a yellow square"]
    assert {**read.metadata, **read.samplers[0].parameters}.get("denoising_strength", read.metadata.get(
        "Denoising strength")) == "0.75"

    # inverted, the mask keeps the right half instead; raw base64 without the data: prefix works too
    body = webuiapi_img2img([png_b64(init)], None, prompt="a yellow square", seed=3, inpainting_mask_invert=1,
                            **SMALL)
    body["mask"] = png_b64(mask)
    out = decoded(server.client.post("/sdapi/v1/img2img", json=body).json()["images"][0]).convert("RGB")
    assert out.crop((48, 0, 64, 64)).tobytes() == init.crop((48, 0, 64, 64)).tobytes()


def test_progress_shows_a_running_generation_with_its_preview(server):
    thread, out = generate_in_background(server.client, {"prompt": PROMPT, "width": 64, "height": 64, "steps": 40,
                                                         "seed": 5})
    try:
        seen = wait_for(server.client, lambda p: p["progress"] > 0 and p["state"]["sampling_step"] > 0
                        and p["current_image"], "a step and a preview")
        assert seen["state"]["job"] == "txt2img" and seen["state"]["sampling_steps"] == 40
        assert decoded(seen["current_image"]).format == "PNG"
        quiet = server.client.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
        assert quiet["current_image"] is None
    finally:
        thread.join()
    assert len(out["response"].json()["images"]) == 1
    idle = server.client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_interrupt_ends_the_generation_early(server):
    n_iter = 50  # far more than runs before the interrupt lands
    thread, out = generate_in_background(server.client, {"prompt": PROMPT, "width": 64, "height": 64,
                                                         "steps": 150, "n_iter": n_iter})
    wait_for(server.client, lambda p: p["state"]["sampling_step"] > 0, "the generation start")
    assert server.client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join()
    r = out["response"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True
    assert len(r.json()["images"]) < n_iter
    assert server.client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True


def test_skip_drops_the_current_batch_and_goes_on(server):
    thread, out = generate_in_background(server.client, {"prompt": PROMPT, "width": 64, "height": 64,
                                                         "steps": 80, "n_iter": 2, "seed": 11})
    wait_for(server.client, lambda p: p["state"]["sampling_step"] > 0, "the generation start")
    assert server.client.post("/sdapi/v1/skip").status_code == 200
    thread.join()
    answer = out["response"].json()
    info = json.loads(answer["info"])
    assert info["skipped_batches"] == 1 and not info["interrupted"]
    assert len(answer["images"]) == 1


def test_options_switch_the_model(server, builtin_model):
    models = {m["model_name"]: m for m in server.client.get("/sdapi/v1/sd-models").json()}
    assert set(models) == {"builtin", "other"}  # the empty folder is not a model
    first = server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert first == models["builtin"]["title"]
    try:
        # clients send the title, often with the .safetensors A1111's files have
        r = server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
        assert r.status_code == 200, r.text
        assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["other"]["title"]
        answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 1, **SMALL}).json()
        assert json.loads(answer["info"])["sd_model_name"] == "other"
    finally:
        server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": first})
    assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == first
    # override_settings switches for one request, and the loaded model comes back after it
    one_request = {"sd_model_checkpoint": models["other"]["title"]}
    answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 1, **SMALL,
                                                           "override_settings": one_request}).json()
    assert json.loads(answer["info"])["sd_model_name"] == "other"
    assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == first


def test_samplers_schedulers_and_loras(server):
    samplers = server.client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "LCM"} <= set(names)
    for name in names:  # every sampler listed generates, and its picture says which it was
        body = {"prompt": PROMPT, "seed": 1, "sampler_name": name, **SMALL}
        r = server.client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, (name, r.text)
        assert f"Sampler: {name}," in decoded(r.json()["images"][0]).info["parameters"]
    labels = [s["label"] for s in server.client.get("/sdapi/v1/schedulers").json()]
    assert "Karras" in labels and "Automatic" in labels
    r = server.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "sampler_name": "DPM++ 2M",
                                                      "scheduler": "Karras", **SMALL})
    assert "Sampler: DPM++ 2M Karras," in decoded(r.json()["images"][0]).info["parameters"]
    loras = server.client.get("/sdapi/v1/loras").json()
    assert [lora["name"] for lora in loras] == ["style"]


def test_png_info_reads_the_parameters_back(server):
    image = server.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": "dull", "seed": 4,
                                                          "cfg_scale": 5.5, **SMALL}).json()["images"][0]
    r = server.client.post("/sdapi/v1/png-info", json={"image": f"data:image/png;base64,{image}"})
    assert r.status_code == 200, r.text
    fields = r.json()["parameters"]
    assert fields["Prompt"] == PROMPT and fields["Negative prompt"] == "dull"
    assert fields["Seed"] == "4" and fields["CFG scale"] == "5.5" and fields["Size-1"] == "64"


def test_the_page_is_served_at_the_root(server):
    r = server.client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "<html" in r.text.lower()


# -- bad requests -------------------------------------------------------------------------------------


def not_image() -> str:
    return base64.b64encode(b"this is text, not a picture").decode()


def test_bad_requests_get_4xx_with_a_message_and_the_server_goes_on(server):
    good = png_b64(Image.new("RGB", (64, 64), "red"))

    def chunked_50mb():  # no Content-Length: the bytes actually read are what counts
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * 2**20
        yield b'"}'

    json_headers = {"content-type": "application/json"}
    cases = {
        "malformed JSON": ("post", "txt2img", dict(content=b'{"prompt": "a cat",', headers=json_headers), 400),
        "not UTF-8": ("post", "txt2img", dict(content=b'{"prompt": "\xff\xfe"}', headers=json_headers), 400),
        "a 50 MB body": ("post", "txt2img", dict(content=b'{"prompt": "' + b"a" * (50 * 2**20) + b'"}',
                                                 headers=json_headers), 413),
        "a 50 MB body, chunked": ("post", "txt2img", dict(content=chunked_50mb(), headers=json_headers), 413),
        "a JSON list for a body": ("post", "txt2img", dict(json=[PROMPT]), 422),
        "a negative size": ("post", "txt2img", dict(json={"prompt": PROMPT, "width": -64}), 422),
        "10,000 steps": ("post", "txt2img", dict(json={"prompt": PROMPT, "steps": 10000}), 422),
        "too many pixels": ("post", "txt2img", dict(json={"prompt": PROMPT, "width": 2048, "height": 2048}), 422),
        "a width not a multiple of 8": ("post", "txt2img", dict(json={"prompt": PROMPT, "width": 100}), 422),
        "a width the model's UNet refuses": ("post", "txt2img", dict(json={"prompt": PROMPT, **SMALL, "width": 72}),
                                             422),
        "steps as a string": ("post", "txt2img", dict(json={"prompt": PROMPT, "steps": "20"}), 422),
        "a prompt that is a number": ("post", "txt2img", dict(json={"prompt": 42}), 422),
        "cfg_scale NaN": ("post", "txt2img", dict(content=b'{"cfg_scale": NaN}', headers=json_headers), 422),
        "a seed below -1": ("post", "txt2img", dict(json={"prompt": PROMPT, "seed": -5}), 422),
        "an unknown sampler": ("post", "txt2img", dict(json={"prompt": PROMPT, "sampler_name": "Heun++ 9M"}), 422),
        "Karras with Euler": ("post", "txt2img", dict(json={"sampler_name": "Euler", "scheduler": "Karras"}), 422),
        "batch_size too large": ("post", "txt2img", dict(json={"prompt": PROMPT, "batch_size": 64}), 422),
        "a script": ("post", "txt2img", dict(json={"prompt": PROMPT, "script_name": "x/y/z plot"}), 422),
        "a LoRA tag with a path": ("post", "txt2img", dict(json={"prompt": "<lora:../../etc/x:1> a cat"}), 422),
        "a model name with ../": ("post", "options", dict(json={"sd_model_checkpoint": "../other"}), 404),
        "an absolute path model name": ("post", "options", dict(json={"sd_model_checkpoint": "/etc"}), 404),
        "a path model name for one request": ("post", "txt2img", dict(json={
            "prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "../models/other"}}), 404),
        "a model name that is a number": ("post", "options", dict(json={"sd_model_checkpoint": 3}), 422),
        "base64 that is not an image": ("post", "img2img", dict(json={"init_images": [not_image()]}), 422),
        "text that is not base64": ("post", "img2img", dict(json={"init_images": ["not base64 at all!"]}), 422),
        "a mask that is not an image": ("post", "img2img", dict(json={"init_images": [good], "mask": not_image()}),
                                        422),
        "img2img without an image": ("post", "img2img", dict(json={"prompt": PROMPT}), 422),
        "denoising_strength out of range": ("post", "img2img", dict(json={"init_images": [good],
                                                                          "denoising_strength": 1.5}), 422),
        "png-info of text": ("post", "png-info", dict(json={"image": not_image()}), 422),
        "a preview interval that is text": ("post", "options", dict(json={"show_progress_every_n_steps": "x"}),
                                            422),
        "skip_current_image that is not a boolean": ("get", "progress?skip_current_image=perhaps", {}, 422),
    }
    for kind, (method, path, kwargs, status) in cases.items():
        r = server.client.request(method.upper(), f"/sdapi/v1/{path}", **kwargs)
        assert r.status_code == status, f"{kind}: {r.status_code} {r.text[:300]}"
        detail = r.json()["detail"]
        assert detail, kind
        if isinstance(detail, str):  # ours: one line; FastAPI's own validation answer is a list
            assert "\n" not in detail and "Traceback" not in detail, kind
    assert len(cases) >= 15
    # and the server answers normally afterwards, on the model it had
    r = server.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 2, **SMALL})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("builtin")


def test_a_client_that_disconnects_mid_generation_leaves_the_server_healthy(server):
    body = json.dumps({"prompt": PROMPT, "width": 64, "height": 64, "steps": 150, "n_iter": 100}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(server.client, lambda p: p["state"]["sampling_step"] > 0, "the generation start")
    # the abandoned generation (100 batches) stops at its next step instead of running on
    wait_for(server.client, lambda p: p["state"]["job_count"] == 0, "the abandoned generation stop", seconds=60)
    r = server.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 2, **SMALL})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


# -- safe by default ----------------------------------------------------------------------------------


def test_auth_is_refused_without_credentials_and_accepted_with_them(builtin_model, tmp_path):
    s = ServeProcess(tmp_path, "--model", str(builtin_model), "--api-auth", "me:s3cret:with-colon,other:pw")
    try:
        s.wait()
        bare = httpx.Client(base_url=s.url, timeout=60)
        for path in ("/sdapi/v1/options", "/"):
            r = bare.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
        assert bare.get("/sdapi/v1/options", auth=("me", "wrong")).status_code == 401
        assert bare.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, **SMALL}).status_code == 401
        r = bare.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, **SMALL}, auth=("me", "s3cret:with-colon"))
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert bare.get("/sdapi/v1/options", auth=("other", "pw")).status_code == 200
        bare.close()
    finally:
        s.stop()


@pytest.mark.parametrize("args, says", [
    (("--host", "0.0.0.0"), "--api-auth"),
    (("--host", "192.168.1.20"), "--api-auth"),
    (("--api-auth", "nopassword"), "USER:PASSWORD"),
])
def test_unsafe_or_malformed_settings_are_refused_in_one_line(args, says):
    # the model does not exist: the refusal comes before anything is loaded
    r = subprocess.run(serve_command("--model", "no-such-model", *args), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("edgediff: error: ") and says in r.stderr


def test_without_fastapi_it_says_which_extra_to_install():
    code = ("import sys; sys.modules['fastapi'] = None; from edgediff.cli import main; "
            "sys.exit(main(['serve', '--model', 'builtin']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == "edgediff: error: edgediff serve needs FastAPI: pip install 'edgediff[serve]'\n"


# -- edgediff.a1111 alone (what `edgediff batch` reads its lines with) --------------------------------


def test_a_job_runs_n_iter_calls_with_a1111s_seeds():
    from edgediff import a1111

    job = a1111.txt2img_job({"prompt": PROMPT, "seed": 2**32 - 2, "batch_size": 2, "n_iter": 3,
                             "sampler_name": "k_dpmpp_2m", "scheduler": "karras", "tiling": True})
    assert [run["seed"] for run in job.runs()] == [2**32 - 2, 0, 2]  # seed + i * batch_size, wrapping
    assert job.kwargs["scheduler"] == "dpmpp_2m_karras" and job.kwargs["num_images_per_prompt"] == 2
    assert job.ignored == ("tiling",)
    random = a1111.txt2img_job({"prompt": PROMPT, "seed": -1, "n_iter": 2})
    first, second = (run["seed"] for run in random.runs())
    assert second == first + 1  # -1 is drawn once, and the batches continue from it
