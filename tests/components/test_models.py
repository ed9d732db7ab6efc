"""The generation expert, the autoencoder and the understanding expert on tiny configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components import sampling as S
from components.models.autoencoder import Autoencoder, AutoencoderConfig, PixelSpace, make_autoencoder
from components.models.generator import GenCondition, Generator, GeneratorConfig
from components.models.understanding import IGNORE, Understanding, UnderstandingConfig

TINY_GEN = dict(vocab_size=20, max_text_len=6, in_channels=4, sample_size=8, patch_size=2, width=32, depth=3,
                heads=2, text_layers=1)


def tiny_generator(**kw) -> Generator:
    torch.manual_seed(0)
    g = Generator(GeneratorConfig(**{**TINY_GEN, **kw}))
    with torch.no_grad():  # leave adaLN-Zero's identity start so every input matters
        for blk in g.blocks:
            blk.ada.weight.normal_(0, 0.05)
        g.proj_out.weight.normal_(0, 0.05)
    return g


def inputs(b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=g)
    cond = GenCondition(text=torch.randint(1, 20, (b, 6), generator=g), source=torch.randn(b, 4, 8, 8, generator=g))
    return x, torch.rand(b, generator=g), cond


def test_generator_shapes_features_and_conditions():
    g = tiny_generator()
    x, t, cond = inputs()
    v, feats = g(x, t, cond, return_features=True)
    assert v.shape == x.shape
    assert len(feats) == 3 and feats[0].shape == (3, 16, 32)
    assert not torch.allclose(g(x, t, cond.without_text()), v)
    assert not torch.allclose(g(x, t, cond.without_image()), v)
    assert (cond.without_text().text == 0).all() and cond.without_image().source is None
    # a per-sample presence flag equals dropping the source for those rows
    mixed = GenCondition(cond.text, cond.source, has_source=torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(g(x, t, mixed)[1], g(x, t, cond.without_image())[1], atol=1e-5)
    assert torch.allclose(g(x, t, mixed)[0], v[0], atol=1e-5)


def test_masked_text_padding_changes_nothing():
    """text_mask: the padding takes no part (attention, pooled text), so a text padded to the full
    length gives the velocity of its words alone; the text-free condition (all padding) is the image
    tokens alone, and the passes are cut after the batch's last word. Unmasked, the padding is read."""
    x, t, cond = inputs()
    words = torch.tensor([[3, 4, 0, 0, 0, 0], [5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    for masked in (True, False):
        g = tiny_generator(text_mask=masked).eval()
        with torch.no_grad():
            full = g(x, t, GenCondition(words, cond.source))
            for i, n in enumerate((2, 3, 6)):
                short = g(x[i:i + 1], t[i:i + 1], GenCondition(words[i:i + 1, :n], cond.source[i:i + 1]))
                assert torch.allclose(full[i:i + 1], short, atol=1e-5) == (masked or n == 6)
            none = GenCondition(words, cond.source).without_text()
            assert torch.allclose(g(x, t, none), g(x, t, GenCondition(words[:, :0], cond.source)), atol=1e-5) == masked
            assert torch.isfinite(g(x, t, none)).all()
            # masked, the passes hold no padding: a text is cut after the batch's last word
            cut = g.with_context(GenCondition(words[:2], cond.source[:2]))
            assert cut.text.shape[1] == cut.context.shape[1] == (3 if masked else 6)
            assert g.trim_text(none).text.shape[1] == (0 if masked else 6)
            assert torch.allclose(g(x[:2], t[:2], cut), full[:2], atol=1e-5)


def test_fresh_generator_predicts_zero_velocity():
    g = Generator(GeneratorConfig(**TINY_GEN))
    x, t, cond = inputs()
    assert torch.count_nonzero(g(x, t, cond)) == 0  # zero-initialised output layer


def test_x0_prediction_is_returned_as_the_velocity_of_its_clean_sample():
    """prediction x0: forward gives v = (x_t - x0_hat) / max(t, t_min); the same weights read as a
    velocity model give x0_hat itself."""
    g = tiny_generator(prediction="x0")
    x, _, cond = inputs()
    t = torch.tensor([0.5, 0.02, 1.0])
    raw = tiny_generator()  # same seed and init: the velocity-output twin computes x0_hat
    raw.load_state_dict(g.state_dict())
    x0_hat = raw(x, t, cond)
    v = g(x, t, cond)
    expect = (x - x0_hat) / torch.tensor([0.5, 0.05, 1.0]).view(3, 1, 1, 1)
    assert torch.allclose(v, expect, atol=1e-5)
    # following that velocity from t to 0 lands on the predicted clean sample
    assert torch.allclose(x[0] - 0.5 * v[0], x0_hat[0], atol=1e-5)


def test_conv_head_starts_at_zero_and_lets_neighbouring_patches_interact():
    g = Generator(GeneratorConfig(**{**TINY_GEN, "head_channels": 4}))
    x, t, cond = inputs()
    assert torch.count_nonzero(g(x, t, cond)) == 0
    torch.manual_seed(0)
    with torch.no_grad():
        for blk in g.blocks:
            blk.ada.weight.normal_(0, 0.05)
        g.proj_out.weight.normal_(0, 0.05)
        g.head[-1].weight.normal_(0, 0.05)
    # a change of x inside one 2x2 patch reaches the pixels across its border through the convolutions
    # only (attention is off: a single block whose attention output is zeroed)
    g2 = Generator(GeneratorConfig(**{**TINY_GEN, "head_channels": 4, "depth": 1}))
    g2.load_state_dict({k: v for k, v in g.state_dict().items() if not k.startswith("blocks.1") and not k.startswith("blocks.2")})
    with torch.no_grad():
        g2.blocks[0].proj.weight.zero_()
        g2.blocks[0].proj.bias.zero_()
    x2 = x.clone()
    x2[:, :, 0:2, 0:2] += 1.0
    diff = (g2(x2, t, cond) - g2(x, t, cond)).abs().sum(dim=(0, 1))
    assert diff[2, 0] > 0 and diff[0, 2] > 0  # the neighbouring patch's first pixels moved
    assert diff[5:, 5:].sum() == 0  # far pixels did not (the head sees 3 pixels around)
    loss = g(x, t, cond).pow(2).mean()
    loss.backward()
    assert g.head[0].weight.grad.abs().sum() > 0 and g.proj_out.weight.grad.abs().sum() > 0


def test_extra_embeddings_are_zero_initialised_and_trainable():
    g = tiny_generator()
    x, t, cond = inputs()
    before = g(x, t, cond)
    g.add_extra_embeddings(["text_scale", "image_scale"])
    assert g.cfg.extra_embeddings == ["text_scale", "image_scale"]
    extra = {"text_scale": torch.tensor([1.0, 3.0, 5.0]), "image_scale": torch.tensor(1.5)}
    after = g(x, t, GenCondition(cond.text, cond.source, extra=extra))
    assert torch.allclose(before, after)
    with pytest.raises(ValueError, match="image_scale"):
        g(x, t, GenCondition(cond.text, cond.source, extra={"text_scale": extra["text_scale"]}))
    after.sum().backward()
    assert g.extra_embed["text_scale"].linear_2.weight.grad.abs().sum() > 0
    # a config with the embeddings rebuilds the same module layout, so weights load strictly
    g2 = Generator(g.cfg)
    g2.load_state_dict(g.state_dict())


def test_constant_scale_embeddings_are_reused_until_the_weights_change():
    g = tiny_generator()
    g.add_extra_embeddings(["text_scale", "image_scale"])
    with torch.no_grad():
        for p in g.extra_embed.parameters():
            p.normal_(0, 0.1)
    x, t, cond = inputs()
    as_numbers = GenCondition(cond.text, cond.source).with_scales(4.0, 1.5)
    as_tensors = GenCondition(cond.text, cond.source).with_scales(torch.full((3,), 4.0), torch.full((3,), 1.5))
    with torch.no_grad():
        ref = g(x, t, as_tensors)  # tensors: computed every call, never cached
        assert torch.allclose(g(x, t, as_numbers), ref, atol=1e-6)
        assert len(g._constant_embeddings) == 2
        cached = {name: hit[1] for name, hit in g._constant_embeddings.items()}
        computed = []
        embed = g._embed
        extras = set(map(id, g.extra_embed.values()))
        g._embed = lambda emb, *a: (id(emb) in extras and computed.append(emb)) or embed(emb, *a)  # scale embeddings
        assert torch.allclose(g(x, t, as_numbers), ref, atol=1e-6)
        assert computed == [] and all(g._constant_embeddings[k][1] is v for k, v in cached.items())  # the cache
        assert not torch.allclose(g(x, t, GenCondition(cond.text, cond.source).with_scales(2.0, 1.5)), ref)
        assert len(computed) == 1 and len(g._constant_embeddings) == 3  # a new text scale; the image scale hit
        # one entry per value: back to 4.0 (as an edit's scales come back above the CFG interval's edge)
        assert torch.allclose(g(x, t, as_numbers), ref, atol=1e-6) and len(computed) == 1
    # an optimiser step changes the weights in place: the next call recomputes
    opt = torch.optim.SGD(g.extra_embed.parameters(), lr=0.01)
    g(x, t, as_tensors).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        fresh = g(x, t, as_tensors)
        assert not torch.allclose(fresh, ref)
        computed.clear()
        assert torch.allclose(g(x, t, as_numbers), fresh, rtol=1e-5, atol=1e-5)
        assert len(computed) == 2  # both constant embeddings recomputed after the step
        # loading other weights also invalidates it
        g.load_state_dict({k: v.clone() for k, v in g.state_dict().items()} | {
            "extra_embed.text_scale.linear_2.bias": torch.ones_like(g.extra_embed["text_scale"].linear_2.bias)})
        assert torch.allclose(g(x, t, as_numbers), g(x, t, as_tensors), rtol=1e-5, atol=1e-5)


def test_a_sampler_encodes_each_conditions_text_once():
    """``with_context`` carries the text encoding (independent of x and t) so that the passes of a
    sampling call do not recompute it: the same velocity, the encoder not run again, dropped when
    the text changes (the text-free condition), refused when its shape does not fit the text."""
    from dataclasses import replace

    g = tiny_generator().eval()
    x, t, cond = inputs()
    calls = []
    with torch.no_grad():
        c = g.with_context(cond)
        assert c.context.shape == (3, 6, 32)
        hook = g.text.register_forward_hook(lambda *a: calls.append(1))
        assert torch.equal(g(x, t, c), g(x, t, cond))
        assert calls == [1]  # only the pass without a context encoded its text
        assert torch.equal(g(x, t, c.without_image()), g(x, t, cond.without_image()))
        assert c.without_text().context is None
        assert torch.equal(g(x, t, c.without_text()), g(x, t, cond.without_text()))
        hook.remove()
        with pytest.raises(ValueError, match="context of shape"):
            g(x, t, replace(c, context=c.context[:, :3]))


def test_generator_samples_with_bagel_cfg_through_the_generic_sampler():
    g = tiny_generator().eval()
    x, _, cond = inputs(2)
    conds = S.Conditions(cond, cond.without_text(), cond.without_image())
    counter = S.NFECounter(g)
    with torch.no_grad():
        out = S.sample(counter, x, conds, num_steps=4, cfg=S.EDIT_CFG, token_patch=g.cfg.patch_size)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert counter.nfe == 3 * sum(0.4 < t for t in S.timesteps(4)[:-1]) + sum(t <= 0.4 for t in S.timesteps(4)[:-1])


def test_text_length_is_checked():
    g = tiny_generator()
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="at most 6"):
        g(x, t, GenCondition(torch.ones(3, 7, dtype=torch.long)))


def test_autoencoder_round_trip_shapes_and_calibration():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(channels=(8, 16)))
    imgs = torch.rand(4, 3, 64, 64) * 2 - 1
    loss, logs = ae(imgs)
    loss.backward()
    assert set(logs) == {"ae_l1", "ae_mse"}
    assert not ae.is_calibrated
    ae.calibrate(imgs)
    assert ae.is_calibrated
    z = ae.encode(imgs)
    assert z.shape == (4, 4, 16, 16)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert ae.decode(z).shape == imgs.shape
    with pytest.raises(ValueError, match="64, 64"):
        ae.encode(torch.zeros(1, 3, 32, 32))


def test_each_autoencoder_level_halves_the_latent_side():
    """Two levels give BAGEL-like 16x16 latents (4x down), three the f8 latents (8x8); the two-level
    layout keeps its parameter names, so checkpoints written before levels were configurable load."""
    imgs = torch.rand(2, 3, 64, 64) * 2 - 1
    for channels, side in (((8, 16), 16), ((8, 16, 32), 8)):
        cfg = AutoencoderConfig(channels=channels, latent_channels=6)
        ae = make_autoencoder(cfg)
        assert cfg.down == 64 // side and cfg.latent_size == side
        z = ae.encode(imgs)
        assert z.shape == (2, 6, side, side) and ae.decode(z).shape == imgs.shape
    names = set(make_autoencoder(AutoencoderConfig(channels=(8, 16))).state_dict())
    assert {"encoder.2.weight", "encoder.4.conv2.weight", "encoder.6.weight", "decoder.4.weight",
            "decoder.7.conv1.weight", "decoder.9.weight"} <= names
    with pytest.raises(ValueError, match="multiple"):
        AutoencoderConfig(image_size=68, channels=(8, 16, 32))  # 68 is a multiple of 4, not of 8
    AutoencoderConfig(image_size=68, channels=(8, 16))


def test_pixel_space_is_the_identity_without_weights():
    ae = make_autoencoder(AutoencoderConfig(kind="pixel"))
    imgs = torch.rand(2, 3, 64, 64) * 2 - 1
    assert isinstance(ae, PixelSpace) and not ae.trainable
    assert list(ae.parameters()) == [] and ae.state_dict() == {} and ae.is_calibrated
    assert ae.cfg.latent_size == 64 and ae.cfg.sample_channels == 3
    ae.calibrate(imgs)
    assert torch.equal(ae.encode(imgs), imgs) and torch.equal(ae.decode(imgs), imgs)
    with pytest.raises(ValueError, match="nothing to train"):
        ae(imgs)
    with pytest.raises(ValueError, match="64, 64"):
        ae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="make_autoencoder"):
        Autoencoder(AutoencoderConfig(kind="pixel"))


def test_pixel_space_at_half_resolution_averages_down_and_scales_back_up():
    ae = make_autoencoder(AutoencoderConfig(kind="pixel", pixel_factor=2))
    assert ae.cfg.latent_size == 32
    imgs = torch.zeros(1, 3, 64, 64)
    imgs[:, 0, :32] = 1.0  # top half red channel on, bottom off
    z = ae.encode(imgs)
    assert z.shape == (1, 3, 32, 32)
    assert torch.equal(z[:, 0, :16], torch.ones(1, 16, 32)) and torch.equal(z[:, 0, 16:], torch.zeros(1, 16, 32))
    rec = ae.decode(z)
    assert rec.shape == imgs.shape
    # flat regions come back exactly; only the rows next to the edge are interpolated
    assert torch.allclose(rec[:, 0, :28], imgs[:, 0, :28]) and torch.allclose(rec[:, 0, 36:], imgs[:, 0, 36:])
    with pytest.raises(ValueError, match="multiple"):
        AutoencoderConfig(kind="pixel", image_size=66, pixel_factor=4)


TINY_UND = dict(vocab_size=30, sep_id=1, eos_id=2, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64,
                encoder_channels=(8, 16))


def test_understanding_loss_ignores_prefix_and_question():
    torch.manual_seed(0)
    m = Understanding(UnderstandingConfig(**TINY_UND))
    ids = torch.tensor([[5, 6, 1, 9, 2], [7, 1, 8, 2, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 9, 2], [IGNORE, IGNORE, 8, 2, IGNORE]])
    loss = m(torch.randn(2, 3, 64, 64), ids, labels)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(30.0)).item(), rel=0.2)
    loss.backward()
    assert m.encoder.net[0].weight.grad.abs().sum() > 0
    assert m.encoder(torch.zeros(3, 3, 64, 64)).shape == (3, m.n_image_tokens, 32)


def test_object_heads_add_a_loss_on_the_image_tokens_only_where_labelled():
    torch.manual_seed(0)
    m = Understanding(UnderstandingConfig(**TINY_UND, encoder="cnn", object_classes=6, object_colours=10))
    images, ids = torch.randn(2, 3, 64, 64), torch.tensor([[5, 1, 9, 2], [7, 1, 8, 2]])
    labels = torch.tensor([[IGNORE, IGNORE, 9, 2], [IGNORE, IGNORE, 8, 2]])
    objects = {"cls": torch.zeros(2, 64, dtype=torch.long), "colour": torch.zeros(2, 64, dtype=torch.long)}
    objects["cls"][0, 10], objects["colour"][0, 10] = 3, 4
    objects["cls"][1], objects["colour"][1] = IGNORE, IGNORE  # a row without a scene
    losses = m(images, ids, labels, objects)
    assert set(losses) == {"lm", "object"}
    lm_loss, obj = losses["lm"], losses["object"]
    assert torch.equal(lm_loss, m(images, ids, labels))  # the language loss is unchanged by the heads
    assert obj.item() == pytest.approx(torch.log(torch.tensor(7.0 * 11.0)).item(), rel=0.3)  # ln 7 + ln 11
    obj.backward()
    assert m.encoder.net[0].weight.grad.abs().sum() > 0 and m.lm.lm_head.weight.grad is None
    # the unlabelled row contributes nothing: changing its image leaves the loss as it was
    other = images.clone()
    other[1] = torch.randn(3, 64, 64)
    assert torch.allclose(m(other, ids, labels, objects)["object"], obj)
    nothing = {k: torch.full_like(v, IGNORE) for k, v in objects.items()}
    assert m(images, ids, labels, nothing)["object"].item() == 0.0  # a batch without scenes: no loss, no NaN
    with pytest.raises(ValueError, match="no object heads"):
        Understanding(UnderstandingConfig(**TINY_UND))(images, ids, labels, objects)


def test_locate_head_reads_the_named_tokens_at_its_layer_and_learns_where_they_point():
    """The locate loss is the column's plus the row's cross-entropy of the head on the hidden state after
    ``locate_layer`` at the given tokens: checked against a recomputation, then learnt on a toy task."""
    torch.manual_seed(0)
    cfg = UnderstandingConfig(**{**TINY_UND, "layers": 4}, locate_bins=4)
    assert cfg.locate_at == 2  # half the depth by default
    m = Understanding(cfg)
    images, ids = torch.randn(3, 3, 64, 64), torch.tensor([[5, 6, 1, 9, 2], [7, 1, 8, 2, 0], [5, 7, 1, 9, 2]])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3] = 9
    locate = torch.tensor([[0, 1, 3, 0], [2, 0, 1, 2], [2, 1, 0, 3]])  # (row, token, column, row of the centre)
    losses = m(images, ids, labels, locate=locate)
    assert set(losses) == {"lm", "locate"} and torch.equal(losses["lm"], m(images, ids, labels))
    hidden = m.lm(inputs_embeds=m._embed(images, ids), output_hidden_states=True).hidden_states[2]
    out = m.locate_head(hidden[locate[:, 0], m.n_image_tokens + locate[:, 1]])
    want = F.cross_entropy(out[:, :4], locate[:, 2]) + F.cross_entropy(out[:, 4:], locate[:, 3])
    assert losses["locate"].item() == pytest.approx(want.item(), rel=1e-5)
    assert m(images, ids, labels, locate=locate[:0])["locate"].item() == 0.0  # no names in the batch: 0, no NaN
    # the image decides the answer: after training, the head reads a bright quadrant's place off the token
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    quad = torch.arange(16) % 4
    for _ in range(150):
        imgs = torch.zeros(16, 3, 64, 64)
        for i, q in enumerate(quad.tolist()):
            imgs[i, :, 32 * (q // 2):32 * (q // 2) + 32, 32 * (q % 2):32 * (q % 2) + 32] = 1.0
        tgt = torch.stack([torch.arange(16), torch.ones(16, dtype=torch.long), 3 * (quad % 2), 3 * (quad // 2)], 1)
        loss = m(imgs, ids[:1].expand(16, -1), labels[:1].expand(16, -1), locate=tgt)["locate"]
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    with pytest.raises(ValueError, match="no locate head"):
        Understanding(UnderstandingConfig(**TINY_UND))(images, ids, labels, locate=locate)
    with pytest.raises(ValueError, match="deeper"):
        UnderstandingConfig(**TINY_UND, locate_bins=4, locate_layer=99)


def test_a_locate_head_added_to_a_trained_model_is_saved_in_its_config():
    m = Understanding(UnderstandingConfig(**TINY_UND))
    m.add_locate_head(8, 1)
    assert (m.cfg.locate_bins, m.cfg.locate_at) == (8, 1) and m.locate_head.out_features == 16
    again = Understanding(UnderstandingConfig.model_validate(m.cfg.model_dump()))
    again.load_state_dict(m.state_dict())  # the config rebuilds the same modules
    with pytest.raises(ValueError, match="already has"):
        m.add_locate_head(8)


def test_the_locate_heads_colour_output_adds_the_named_objects_colour_to_its_loss():
    """locate_colours: the loss gains the colour's cross-entropy at the same tokens (rows carry the colour
    last); a model with a locate head gains the output later, saved in its config; wrong widths are named."""
    torch.manual_seed(0)
    m = Understanding(UnderstandingConfig(**{**TINY_UND, "layers": 4}, locate_bins=4))
    images, ids = torch.randn(2, 3, 64, 64), torch.tensor([[5, 6, 1, 9, 2], [7, 1, 8, 2, 0]])
    labels = torch.full_like(ids, IGNORE)
    locate = torch.tensor([[0, 1, 3, 0, 2], [1, 0, 1, 2, 5]])  # (row, token, column, row, colour)
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        m(images, ids, labels, locate=locate)
    only_place = m(images, ids, labels, locate=locate[:, :4])["locate"]
    m.add_locate_colours(6)
    assert m.cfg.locate_colours == 6 and m.locate_colour_head.out_features == 6
    with pytest.raises(ValueError, match="already predicts"):
        m.add_locate_colours(6)
    got = m(images, ids, labels, locate=locate)["locate"]
    hidden = m.lm(inputs_embeds=m._embed(images, ids), output_hidden_states=True).hidden_states[2]
    colour = F.cross_entropy(m.locate_colour_head(hidden[locate[:, 0], m.n_image_tokens + locate[:, 1]]), locate[:, 4])
    assert got.item() == pytest.approx(only_place.item() + colour.item(), rel=1e-5)
    assert m(images, ids, labels, locate=locate[:0])["locate"].item() == 0.0
    again = Understanding(UnderstandingConfig.model_validate(m.cfg.model_dump()))
    again.load_state_dict(m.state_dict())  # the config rebuilds the colour output too
    with pytest.raises(ValueError, match="needs a locate head"):
        UnderstandingConfig(**TINY_UND, locate_colours=6)


def test_the_count_head_reads_the_description_token_at_the_locate_layer():
    """count_classes: the count loss is the head's cross-entropy on the hidden state after locate_layer at
    the given tokens (checked against a recomputation); added later, it is saved in the config."""
    torch.manual_seed(0)
    m = Understanding(UnderstandingConfig(**{**TINY_UND, "layers": 4}))
    images, ids = torch.randn(2, 3, 64, 64), torch.tensor([[5, 6, 1, 9, 2], [7, 1, 8, 2, 0]])
    labels = torch.full_like(ids, IGNORE)
    count = torch.tensor([[0, 1, 3], [1, 2, 0]])  # (row, token, how many)
    with pytest.raises(ValueError, match="no count head"):
        m(images, ids, labels, count=count)
    m.add_count_head(6)
    with pytest.raises(ValueError, match="already has"):
        m.add_count_head(6)
    losses = m(images, ids, labels, count=count)
    assert set(losses) == {"lm", "count"}
    hidden = m.lm(inputs_embeds=m._embed(images, ids), output_hidden_states=True).hidden_states[m.cfg.locate_at]
    want = F.cross_entropy(m.count_head(hidden[count[:, 0], m.n_image_tokens + count[:, 1]]), count[:, 2])
    assert losses["count"].item() == pytest.approx(want.item(), rel=1e-5)
    assert m(images, ids, labels, count=count[:0])["count"].item() == 0.0
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        m(images, ids, labels, count=count[:, :2])
    again = Understanding(UnderstandingConfig.model_validate(m.cfg.model_dump()))
    again.load_state_dict(m.state_dict())


def test_understanding_kv_cache_generation_matches_recomputation():
    torch.manual_seed(0)
    m = Understanding(UnderstandingConfig(**TINY_UND)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    imgs = torch.randn(3, 3, 64, 64)
    prompts = [[5, 6, 1], [7, 1], [5, 6, 7, 8, 1]]
    answers = m.generate(imgs, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):  # no cache, no padding, one row at a time
        seq: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                logits = m.lm(inputs_embeds=m._embed(imgs[i:i + 1], torch.tensor([p + seq]))).logits
                nxt = int(logits[0, -1].argmax())
                if nxt == 2:
                    break
                seq.append(nxt)
        assert answers[i] == seq


def _random_understanding(layers: int, seed: int) -> tuple[Understanding, torch.Tensor]:
    """A tiny expert with large random weights (every layer matters) and 12 token ids."""
    torch.manual_seed(seed)
    m = Understanding(UnderstandingConfig(**{**TINY_UND, "layers": layers})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m, torch.randint(3, 30, (1, 12))


def test_lean_decoding_computes_what_transformers_computes():
    """The static-cache forward used for decoding (kv_decoder) against transformers' Qwen2: a prefill
    with hidden states, then a crop and a multi-token continuation on the cache, to float32 rounding;
    and the draft's decoder against Draft.fuse / Draft.step on transformers' DynamicCache."""
    from transformers import DynamicCache

    from components.models.draft import Draft, DraftConfig, DraftDecoder, target_states
    from components.models.kv_decoder import LeanLM

    m, ids = _random_understanding(layers=4, seed=0)
    with torch.no_grad():
        embeds = m.lm.get_input_embeddings()(ids)
        full = m.lm(inputs_embeds=embeds, output_hidden_states=True)
        lean = LeanLM(m.lm, 1, 16)
        logits, states = lean.forward(embeds[:, :9], torch.arange(9)[None], hidden=True)
        assert torch.allclose(logits, full.logits[:, :9], atol=1e-5)
        assert len(states) == len(full.hidden_states) == 5
        for mine, theirs in zip(states, full.hidden_states):
            assert torch.allclose(mine, theirs[:, :9], atol=1e-5)
        lean.forward(torch.randn(1, 2, 32), torch.arange(9, 11)[None])  # a rejected continuation ...
        lean.crop(9)                                                     # ... cropped away
        logits, _ = lean.forward(embeds[:, 9:], torch.arange(9, 12)[None])
        assert torch.allclose(logits, full.logits[:, 9:], atol=1e-5)
        with pytest.raises(ValueError, match="16 slots"):
            lean.forward(torch.zeros(1, 5, 32), torch.arange(12, 17)[None])

        draft = Draft.from_target(m, DraftConfig.for_target(m, zero_init=False)).eval()
        st = target_states(full)
        nxt = torch.randn(1, 12, 32)
        dec_cache, d_cache = DynamicCache(), DynamicCache()
        feat = draft.fuse(st[:, :7], torch.arange(7), dec_cache)
        feat = torch.cat([feat, draft.fuse(st[:, 7:], torch.arange(7, 12), dec_cache)], dim=1)
        h = draft.step(feat, nxt, torch.arange(12), d_cache)
        dd = DraftDecoder(draft, 16)
        mine = torch.cat([dd.fuse(st[:, :7], torch.arange(7)), dd.fuse(st[:, 7:], torch.arange(7, 12))], dim=1)
        assert torch.allclose(mine, feat, atol=1e-5)
        assert torch.allclose(dd.step(mine, nxt, torch.arange(12)), h, atol=1e-5)
        assert torch.allclose(dd.logits(h), draft.logits(h), atol=1e-5)
        assert torch.equal(dd.embed(ids), draft.embed(ids))


def test_a_token_tree_reads_its_ancestors_only_and_keeps_its_path():
    """Verifying a token tree in one forward (``attend``): each node's logits are those of its own
    path decoded alone; ``keep`` then leaves the cache of the accepted path, contiguous."""
    from components.models.kv_decoder import LeanLM

    m, ids = _random_understanding(layers=3, seed=1)
    with torch.no_grad():
        emb = m.lm.get_input_embeddings()
        full = m.lm(inputs_embeds=emb(ids)).logits
        lean = LeanLM(m.lm, 1, 20)
        lean.forward(emb(ids[:, :6]), torch.arange(6)[None])
        # rows: x = ids[6]; its children a = ids[7] and b (another token); a's child c = ids[8], b's child d
        tree = [int(ids[0, 6]), int(ids[0, 7]), 29, int(ids[0, 8]), 28]
        parents = [-1, 0, 0, 1, 2]
        attend = torch.zeros(5, 11, dtype=torch.bool)
        attend[:, :6] = True
        for r in range(5):
            a = r
            while a >= 0:
                attend[r, 6 + a] = True
                a = parents[a]
        logits, _ = lean.forward(emb(torch.tensor([tree])), torch.tensor([[6, 7, 7, 8, 8]]), attend=attend)
        assert torch.allclose(logits[0, [0, 1, 3]], full[0, 6:9], atol=1e-5)   # the path x -> a -> c
        alt = torch.cat([ids[:, :7], torch.tensor([[29, 28]])], dim=1)          # the path x -> b -> d
        assert torch.allclose(logits[0, [2, 4]], m.lm(inputs_embeds=emb(alt)).logits[0, 7:9], atol=1e-5)
        with pytest.raises(ValueError, match="ascending"):
            lean.keep(6, [7, 6])
        with pytest.raises(ValueError, match="attend is"):
            lean.forward(emb(ids[:, 9:]), torch.arange(9, 12)[None], attend=torch.ones(3, 3, dtype=torch.bool))
        lean.keep(6, [6, 7, 9])  # x, a, c
        logits, _ = lean.forward(emb(ids[:, 9:]), torch.arange(9, 12)[None])
        assert torch.allclose(logits, full[:, 9:], atol=1e-5)


def test_lean_decoding_follows_weight_changes():
    """The fused projections are reused while the weights are unchanged and rebuilt when they change."""
    from components.models.kv_decoder import LeanLM

    torch.manual_seed(0)
    m = Understanding(UnderstandingConfig(**TINY_UND)).eval()
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        before = LeanLM(m.lm, 1, 8).forward(x, torch.arange(5)[None])[0]
        assert torch.equal(LeanLM(m.lm, 1, 8).forward(x, torch.arange(5)[None])[0], before)
        m.lm.model.layers[0].self_attn.k_proj.weight.add_(0.5)  # as an optimiser step would
        after = LeanLM(m.lm, 1, 8).forward(x, torch.arange(5)[None])[0]
        assert not torch.allclose(after, before)
        assert torch.allclose(after, m.lm(inputs_embeds=x).logits, atol=1e-5)


def test_weights_key_follows_every_kind_of_weight_change():
    """The fingerprint caches key on changes when a weight changes in place, is replaced, is assigned
    new data, or a buffer changes; it stays the same otherwise, and the mode is part of it."""
    from components.models.state_key import weights_key

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    key = weights_key(m)
    assert weights_key(m) == key
    assert len(key[1]) == len(list(m.parameters())) + len(list(m.buffers()))
    assert len(weights_key(m, buffers=False)[1]) == len(list(m.parameters()))
    changes = [lambda: m[0].weight.add_(1.0),                            # an optimiser step
               lambda: setattr(m[0], "bias", torch.nn.Parameter(torch.zeros(4))),  # a new tensor
               lambda: setattr(m[0].weight, "data", m[0].weight.data.clone()),    # new data, same Parameter
               lambda: m[1].running_mean.add_(1.0),                    # a buffer
               lambda: m.eval()]                                       # the mode
    for change in changes:
        with torch.no_grad():
            change()
        assert weights_key(m) != key
        key = weights_key(m)
    with torch.no_grad():
        m[1].running_var.add_(1.0)
    assert weights_key(m, buffers=False) == weights_key(m, buffers=False)


def test_stored_bfloat16_weights_compute_what_autocast_computes_and_follow_weight_changes():
    """Sampling runs the generator and the decoder from bfloat16 copies of their weights: the same
    numbers autocast computes from the float32 weights, the originals untouched, the copy reused
    while the weights are unchanged and rebuilt after an in-place change."""
    from components.inference import bf16_weights

    g = tiny_generator().eval()
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(channels=(8, 16))).eval()
    x, t, cond = inputs()
    z = torch.randn(2, 4, 16, 16)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), bf16:
        fast = bf16_weights(g)
        assert fast is not g and fast.blocks[0].qkv.weight.dtype == torch.bfloat16
        assert g.blocks[0].qkv.weight.dtype == torch.float32
        assert torch.equal(fast(x, t, cond), g(x, t, cond))
        assert bf16_weights(g) is fast
        assert torch.equal(bf16_weights(ae).decode(z), ae.decode(z))
    with torch.no_grad():
        g.blocks[0].qkv.weight.add_(0.1)  # as an optimiser step would
        ae.latent_std.mul_(2.0)  # a buffer: recalibration
    with torch.no_grad(), bf16:
        again = bf16_weights(g)
        assert again is not fast and torch.equal(again(x, t, cond), g(x, t, cond))
        assert not torch.equal(again(x, t, cond), fast(x, t, cond))
        assert torch.equal(bf16_weights(ae).decode(z), ae.decode(z))


def test_bf16_autocast_only_where_the_cpu_computes_bfloat16():
    """bf16 is honoured on CPUs with native bfloat16 and falls back to float32 elsewhere (emulated
    bfloat16 is ~20x slower than float32); never on request of float32."""
    from components.inference import autocast, bf16_native

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast(True):
        assert lin(x).dtype == (torch.bfloat16 if bf16_native() else torch.float32)
    with autocast(False):
        assert lin(x).dtype == torch.float32
