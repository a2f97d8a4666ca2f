"""The built-in Chinese vocabulary of the synthetic layout data (colours, shapes, backgrounds).

Shared by the synthetic dataset (captions and labels) and the tiny stack's SentencePiece
training corpus, so the tiny tokenizer covers every word the synthetic data uses.
"""
# name -> RGB
COLORS = {
    "红色": (220, 30, 30),
    "绿色": (30, 170, 60),
    "蓝色": (30, 80, 220),
    "黄色": (235, 200, 20),
    "紫色": (140, 50, 180),
    "橙色": (245, 130, 20),
    "青色": (20, 190, 200),
    "黑色": (20, 20, 20),
}
SHAPES = ("圆形", "正方形", "三角形", "菱形")
BACKGROUNDS = {
    "白色": (245, 245, 245),
    "灰色": (150, 150, 150),
    "米色": (225, 215, 190),
}
POSITIONS = ("左上", "右上", "左下", "右下", "中间")

# Free Chinese text for the tokenizer corpus beyond the synthetic captions.
EXTRA_TEXT = (
    "一只橘猫趴在沙发上。",
    "一个小女孩在公园里放风筝，天空很蓝。",
    "桌子上放着一杯咖啡和一本书。",
    "夕阳下的海边，有两艘小船。",
    "城市的夜景，高楼灯火通明。",
    "一只白色的狗在草地上奔跑。",
    "山上有雪，山下是一片森林。",
    "厨房里有一个红色的苹果和一把刀。",
    "画面中有一辆汽车停在路边。",
    "这是一张照片，图片里有人、动物和建筑。",
)
