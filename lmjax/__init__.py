"""lmjax: a JAX-native framework for training decoder language models.

    import lmjax
    m = lmjax.load('/tmp/lmjax_tiny')   # an lmjax workdir or a Hugging Face model dir
    print(m.generate('def '))
"""

__version__ = '0.1.0'


def load(path, step=None, **kwargs):
  """lmjax.api.load (imported on first use, so `import lmjax` stays light)."""
  from lmjax import api
  return api.load(path, step, **kwargs)
