"""VQGAN's PatchGAN discriminator (taming-transformers' ``NLayerDiscriminator``) in Keras,
with ActNorm or BatchNorm as its normalisation layers. Used by
``patchgan_discriminator.py`` and by the deployment tests."""

import keras

import tf_actnorm


def patchgan(input_shape, use_actnorm=True, filters=32, n_layers=2):
    """Patch logits for images [H, W, C] (Conv2D) or video clips [T, H, W, C] (Conv3D)."""
    conv = keras.layers.Conv3D if len(input_shape) == 4 else keras.layers.Conv2D
    norm = tf_actnorm.ActNorm if use_actnorm else keras.layers.BatchNormalization
    layers = [keras.Input(input_shape), conv(filters, 4, strides=2, padding="same"),
              keras.layers.LeakyReLU(0.2)]
    for i in range(1, n_layers + 1):
        layers += [conv(filters * 2**i, 4, strides=2 if i < n_layers else 1, padding="same",
                        use_bias=False),  # the normalisation layer brings the bias
                   norm(),
                   keras.layers.LeakyReLU(0.2)]
    layers.append(conv(1, 4, padding="same"))
    return keras.Sequential(layers)
