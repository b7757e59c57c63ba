"""sd-webui-imgcond: image-conditioning controls for Stable Diffusion WebUI Forge."""

__version__ = "0.1.0"
