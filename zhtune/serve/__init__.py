"""Using a trained model: ``zhtune chat`` (terminal), ``zhtune serve`` (OpenAI-compatible API with
``/v1/corrections``) and ``zhtune webui`` (Gradio page).

Every model call goes through :class:`zhtune.serve.backend.Backend`; the server and the page run it from one
:class:`zhtune.serve.batcher.Batcher` worker. FastAPI/uvicorn and Gradio are optional extras (``zhtune[serve]``,
``zhtune[webui]``); nothing here imports them at package import time.
"""
